"""dreidel.optim: curvature-aware optimizers (DiagonalNewton, K-FAC) and ``build_optimizer``."""

from dreidel.optim._base import CurvatureOptimizer
from dreidel.optim._diagonal_newton import DiagonalNewton
from dreidel.optim._factory import OPTIMIZER_NAMES, build_optimizer
from dreidel.optim._kfac import KFAC

__all__ = ["CurvatureOptimizer", "DiagonalNewton", "KFAC", "OPTIMIZER_NAMES", "build_optimizer"]
