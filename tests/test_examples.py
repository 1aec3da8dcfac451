"""The examples run from a checkout (the quick ones)."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_walsh_image_compression(tmp_path):
    plot = tmp_path / "walsh.png"
    result = subprocess.run([sys.executable, str(EXAMPLES / "walsh_image_compression.py"), "--digits", "40",
                             "--plot", str(plot)], capture_output=True, text=True, timeout=300, check=True)
    difference = float(re.search(r"max \|difference\| (\S+)", result.stdout).group(1))
    assert difference < 1e-5  # the 2-D transform is H X H^T
    rows = re.findall(r"^\s*(\d+)%\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s*$", result.stdout, re.MULTILINE)
    walsh = [float(row[2]) for row in rows]
    assert len(rows) == 5 and walsh == sorted(walsh)  # more coefficients kept, closer to the digits
    assert plot.stat().st_size > 10_000


def test_walsh_image_compression_plots_fewer_digits_than_its_six_rows(tmp_path):
    """--digits 1 to 5 with --plot raised IndexError: the figure always drew six digits."""
    plot = tmp_path / "one.png"
    subprocess.run([sys.executable, str(EXAMPLES / "walsh_image_compression.py"), "--digits", "1", "--plot",
                    str(plot)], capture_output=True, text=True, timeout=300, check=True)
    assert plot.stat().st_size > 1_000
