"""dreidel.fwht against independent oracles: the dense Hadamard matrix in float64, and the reference path."""

import functools
import math
import platform
import re
import sys
from pathlib import Path

import pytest
import torch

import dreidel as dr
from dreidel._native import available_isas, native
from dreidel.algo import _fwht as fwht_module
from dreidel.algo._fwht import _fwht_inplace_op, _fwht_op
from dreidel.algo._hadamard import small_hadamard, small_hadamard_array

POW2 = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]  # every split of a row into kernel passes
COMPOSITE = [12, 24, 48, 96, 384, 1536, 20, 40, 320, 28, 56, 448]


def dense_fwht(x: torch.Tensor, dim: int = -1, normalized: bool = True) -> torch.Tensor:
    """The oracle: an explicit matrix product in float64."""
    n = x.shape[dim]
    h = dr.hadamard_matrix(n)
    y = torch.movedim(x.double(), dim, -1) @ h.T
    if normalized:
        y = y / math.sqrt(n)
    return torch.movedim(y, -1, dim)


@pytest.mark.parametrize("n", POW2 + COMPOSITE)
@pytest.mark.parametrize("normalized", [True, False])
def test_matches_dense_matrix_float64(n, normalized, num_threads, generator):
    x = torch.randn(5, n, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(dr.fwht(x, normalized=normalized), dense_fwht(x, normalized=normalized),
                               rtol=1e-12, atol=1e-12 * math.sqrt(n))


@pytest.mark.parametrize("n", POW2 + COMPOSITE + [1 << 14, 1 << 17, 12 << 12])
def test_float32_error_at_most_twice_reference_error(n, num_threads, generator):
    """The accuracy rule of Dao-AILab's fast-hadamard-transform: native error <= 2x the PyTorch path's."""
    x64 = torch.randn(8, n, dtype=torch.float64, generator=generator)
    truth = dr.fwht_reference(x64)  # exact enough: float64
    x = x64.float()
    native_err = (dr.fwht(x).double() - truth).abs().max().item()
    reference_err = (dr.fwht_reference(x).double() - truth).abs().max().item()
    assert native_err <= 2 * reference_err + 1e-7 * 2 ** -20


@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64, 256, 512, 1024, 8192, 12, 24, 48, 96, 192, 384, 12 << 10, 20, 160, 28, 224])
def test_every_isa_matches_reference(isa, dtype, n, generator):
    x = torch.randn(3, n, dtype=torch.float64, generator=generator).to(dtype)
    m, _ = dr.algo.hadamard_factor(n)
    for inplace in (False, True):
        out = x.clone() if inplace else torch.empty_like(x)
        src = out if inplace else x
        native.fwht(src, out, n, small_hadamard(m, dtype), 1 / math.sqrt(n), 2, isa)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(out.double(), dense_fwht(x), rtol=tol, atol=tol * math.sqrt(n))


@pytest.mark.parametrize("n", [1 << 20, 12 << 16, 1 << 22])
def test_long_rows_use_blocked_path_correctly(n, num_threads, generator):
    # Rows longer than the in-cache limit are transformed in cache-blocked passes, threads inside the row
    # (2 rows at 2 threads: a row each). 2^22 float64 values are 32 blocks of 1 MB, crossed in two in-place
    # levels (radix 8, then 4): strip by strip on a CPU with a 2 MB L2 and a 12-way L1, else in groups of 8.
    x = torch.randn(2, n, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(dr.fwht(x), dr.fwht_reference(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("rows", "n"), [(67, 1 << 16), (35, 1 << 17), (17, 1 << 18), (9, 1 << 19), (1, 12 << 19)])
@pytest.mark.parametrize("inplace", [False, True])
def test_calls_of_16_mb_and_more_give_the_transform(rows, n, inplace, dtype, num_threads, generator):
    # At 16 MB and more per call, out of place, rows of 256 KB and 512 KB are crossed while being gathered
    # from memory and then transformed leaf by leaf, one row's leaves alternating with the next row's gather
    # (AVX-512 builds, a 12-way L1); in place, and for longer rows, the leaves go in groups. Odd row counts
    # leave runs of unequal length to the threads; 12 * 2^19 is two blocks of 1 MB per chunk in float32 (four
    # in float64), then H_12; out of place, the input must be left untouched.
    x = torch.randn(rows, n, dtype=torch.float64, generator=generator).to(dtype)
    assert x.numel() * x.element_size() >= 16 << 20
    expected = dr.fwht_reference(x.double())
    before = x.clone()
    out = dr.fwht(x, inplace=inplace)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    if not inplace:
        assert torch.equal(x, before)


def transparent_huge_pages() -> str | None:
    """Linux's THP mode ("always", "madvise" or "never"), or None where there is no such setting."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    found = re.search(r"\[(\w+)\]", text)
    return found.group(1) if found else None


def smaps_values(address: int, size: int, field: str) -> list[str]:
    """The value of ``field`` (``THPeligible``, ``AnonHugePages``, ...) in /proc/self/smaps for each mapping that
    overlaps ``size`` bytes at ``address`` (madvise splits a mapping where the advised range ends, so a buffer
    may span several)."""
    values, inside = [], False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head.group(1), 16) < address + size and address < int(head.group(2), 16)
        elif inside and line.startswith(field + ":"):
            values.append(line.split()[1])
    return values


def thp_eligible(address: int) -> bool:
    """Whether the mapping holding ``address`` may take huge pages (/proc/self/smaps' THPeligible)."""
    values = smaps_values(address, 1, "THPeligible")
    assert values, f"no mapping holds {address:#x}"
    return values[0] == "1"


def test_huge_page_advice_changes_no_contents():
    x = torch.randn(3 << 20)  # 12 MB: at least five whole 2 MB pages inside
    before = x.clone()
    taken = native.advise_huge_pages(x.data_ptr(), x.nbytes)
    assert torch.equal(x, before)
    # Linux accepts the advice whatever the THP mode, where the kernel has THP at all.
    assert taken == (sys.platform == "linux" and transparent_huge_pages() is not None)
    assert not native.advise_huge_pages(x.data_ptr(), 1 << 20), "1 MB holds no whole 2 MB page"
    assert not native.advise_huge_pages(0, 1 << 30)
    assert not native.advise_huge_pages(2**64 - 4096, 4096), "an address range that would wrap around"


def anon_huge_bytes(address: int, size: int) -> int:
    """Bytes on transparent huge pages of the mappings that overlap ``size`` bytes at ``address``."""
    return sum(int(kb) for kb in smaps_values(address, size, "AnonHugePages")) * 1024


def kernel_has_pagemap_scan() -> bool:
    """Linux 6.7 and later answer the PAGEMAP_SCAN ioctl on /proc/self/pagemap."""
    found = re.match(r"(\d+)\.(\d+)", platform.release())
    return (sys.platform == "linux" and found is not None and (int(found.group(1)), int(found.group(2))) >= (6, 7)
            and Path("/proc/self/pagemap").exists())


@pytest.mark.skipif(transparent_huge_pages() in (None, "never"), reason="no transparent huge pages here")
def test_huge_pages_are_told_apart_as_smaps_reports_them():
    # mostly_on_huge_pages asks Linux through PAGEMAP_SCAN; /proc/self/smaps is the independent report. 64 MB
    # buffers are mappings of their own; one advised onto huge pages, one left as allocated (in "always" mode
    # both may be huge, in "madvise" mode only the first).
    advised = torch.empty(16 << 20)
    assert native.advise_huge_pages(advised.data_ptr(), advised.nbytes)
    plain = torch.empty(16 << 20)
    for buffer in (advised, plain):
        buffer.fill_(1.0)  # faulted in: pages not yet present count as small
        on_huge_pages = anon_huge_bytes(buffer.data_ptr(), buffer.nbytes) * 2 > buffer.nbytes
        expected = on_huge_pages and kernel_has_pagemap_scan()
        assert native.mostly_on_huge_pages(buffer.data_ptr(), buffer.nbytes) == expected
    assert not native.mostly_on_huge_pages(0, 1 << 20)
    assert not native.mostly_on_huge_pages(plain.data_ptr(), 0)


@functools.lru_cache(maxsize=1)
def _row_of_2_24_and_truth() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(1, 1 << 24, generator=torch.Generator().manual_seed(24))
    return x, dr.fwht_reference(x.double())


@pytest.mark.parametrize("pages", ["advised", "as_allocated", "fresh_result"])
def test_a_long_row_on_huge_pages_gives_the_transform(pages):
    # On a CPU with a 2 MB L2 and a 12-way L1, a row of more than 32 MB crosses its 64 blocks strip by strip
    # on small pages and in groups of 8 on huge pages (where those rows share L2 sets); either way the
    # transform. "advised": in place on a buffer advised onto huge pages and written (in groups where Linux
    # 6.7+ reports them huge); "as_allocated": in place as PyTorch allocated it (small pages unless THP is
    # "always"); "fresh_result": out of place into an advised result not yet written, whose pages count as small.
    n = 1 << 24
    x, truth = _row_of_2_24_and_truth()
    out = torch.empty_like(x)
    if pages != "as_allocated":
        native.advise_huge_pages(out.data_ptr(), out.nbytes)
    h = small_hadamard(1, torch.float32)
    if pages == "fresh_result":
        native.fwht(x, out, n, h, 1 / math.sqrt(n), 1, "auto", 2 << 20, 12)
    else:
        out.copy_(x)
        if pages == "advised" and transparent_huge_pages() in ("madvise", "always") and kernel_has_pagemap_scan():
            assert native.mostly_on_huge_pages(out.data_ptr(), out.nbytes) == (
                anon_huge_bytes(out.data_ptr(), out.nbytes) * 2 > out.nbytes)
        native.fwht(out, out, n, h, 1 / math.sqrt(n), 1, "auto", 2 << 20, 12)
    torch.testing.assert_close(out.double(), truth, rtol=2e-5, atol=2e-5)


class _RecordingNative:
    """The native module, with the addresses and sizes passed to advise_huge_pages, and the interleave of each
    fwht_at call, recorded."""

    def __init__(self):
        self.advised: list[tuple[int, int]] = []
        self.interleaves: list[int] = []

    def advise_huge_pages(self, address: int, size: int) -> bool:
        self.advised.append((address, size))
        return native.advise_huge_pages(address, size)

    def fwht_at(self, *args):
        self.interleaves.append(args[9] if len(args) > 9 else 1)
        return native.fwht_at(*args)

    def __getattr__(self, name):
        return getattr(native, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_out_of_place_results_are_advised_onto_huge_pages(dtype, monkeypatch, generator):
    # A result of 32 MB or more is advised onto transparent huge pages before the kernel writes it (its first
    # write would otherwise page-fault every 4 KB); a smaller one is left as PyTorch allocated it.
    recording = _RecordingNative()
    monkeypatch.setattr(fwht_module, "native", recording)
    x = torch.randn(1 << 23, generator=generator).to(dtype)  # 32 or 64 MB
    out = dr.fwht(x)
    torch.testing.assert_close(out.double(), dr.fwht_reference(x.double()), rtol=1e-4, atol=1e-4)
    assert recording.advised == [(out.data_ptr(), out.nbytes)]
    small = dr.fwht(torch.randn(1 << 12, 1024, generator=generator))  # 16 MB
    assert len(recording.advised) == 1 and small.shape == (1 << 12, 1024)
    if transparent_huge_pages() == "madvise":  # then only advised memory may take huge pages
        assert thp_eligible(out.data_ptr() + out.nbytes // 2)


@pytest.mark.parametrize(("rows", "n"), [(32, 1 << 17), (64, 1 << 16)])
def test_float32_error_rule_holds_on_the_pipelined_pass(rows, n, generator):
    # The pipelined pass does the stages in another order (across leaves first): the accuracy rule must hold.
    # Out of place, on a Xeon's cache geometry, it takes these rows with the AVX-512 kernels.
    x64 = torch.randn(rows, n, dtype=torch.float64, generator=generator)
    truth = dr.fwht_reference(x64)
    x = x64.float()
    out = torch.empty_like(x)
    native.fwht(x, out, n, small_hadamard(1, torch.float32), 1 / math.sqrt(n), 1, "auto", 2 << 20, 12)
    native_err = (out.double() - truth).abs().max().item()
    reference_err = (dr.fwht_reference(x).double() - truth).abs().max().item()
    assert native_err <= 2 * reference_err


@pytest.mark.parametrize("isa", available_isas())
def test_every_isa_on_a_call_that_streams_from_memory(isa, generator):
    # The pipelined pass (out of place, rows of 256 KB, a Xeon's cache geometry) is taken by the AVX-512
    # kernels only; every ISA must give the same transform.
    n = 1 << 16
    x = torch.randn(64, n, generator=generator)
    out = torch.empty_like(x)
    native.fwht(x, out, n, small_hadamard(1, torch.float32), 1 / math.sqrt(n), 1, isa, 2 << 20, 12)
    torch.testing.assert_close(out.double(), dr.fwht_reference(x.double()), rtol=2e-5, atol=2e-5)


# (L2 bytes, L1d ways) of CPUs whose passes over long rows differ: a Xeon with AVX-512 (2 MB, 12 ways: 1 MB
# blocks crossed strip by strip, rows of 256 and 512 KB pipelined out of place with AVX-512), Zen 3 (512 KB,
# 8 ways: blocks in groups of 8, no pipelining), a 1 MB L2 with 12 ways (groups of 8, rows of 256 KB
# pipelined), and none reported (groups of 8, no pipelining).
CACHE_GEOMETRIES = [(2 << 20, 12), (512 << 10, 8), (1 << 20, 12), (0, 0)]


@functools.lru_cache(maxsize=4)
def _long_rows_and_truth(rows: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n + rows))
    return x, dr.fwht_reference(x.double())


@pytest.mark.parametrize(("rows", "n"), [(1, 1 << 22), (2, 1 << 21), (2, 12 << 18), (64, 1 << 16)])
@pytest.mark.parametrize("geometry", CACHE_GEOMETRIES, ids=lambda g: f"l2_{g[0] >> 10}k_{g[1]}way")
@pytest.mark.parametrize("isa", available_isas())
def test_long_rows_give_the_same_transform_on_every_cache_geometry(geometry, isa, rows, n):
    # 16 MB or more of float32: the calls that stream from memory, where the passes depend most on the CPU.
    # 2^22 points are 16 blocks of 1 MB, crossed in two in-place levels, strip by strip or in groups of 8;
    # 12 * 2^18 mixes twelve rows of 1 MB; rows of 2^16 are pipelined one after another out of place
    # (AVX-512, a 12-way L1). 1 thread, out of place and in place (with AVX-512 and a 12-way L1, in place,
    # each group of 8 leaves is crossed beside the next group's leaves: leaves_crossing); 3 (threads inside
    # one row, unevenly); 16 (the 2^22 row's 64 blocks then go in 32 groups of 2, crossed in two levels strip
    # by strip).
    x, truth = _long_rows_and_truth(rows, n)
    h = small_hadamard(dr.algo.hadamard_factor(n)[0], torch.float32)
    for threads, inplace in ((1, False), (1, True), (3, True), (16, False)):
        out = x.clone() if inplace else torch.empty_like(x)
        native.fwht(out if inplace else x, out, n, h, 1 / math.sqrt(n), threads, isa, *geometry)
        torch.testing.assert_close(out.double(), truth, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("isa", available_isas())
def test_long_float64_rows_in_place_give_the_same_transform_on_every_cache_geometry(isa):
    # float64 leaves are 2048 values: rows of 2^18 take 128 of them, in groups of 8 crossed beside the next
    # group's leaves where the L1 has 12 ways (leaves_crossing, AVX-512), on their own where it has 8.
    x = torch.randn(3, 1 << 18, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    truth = dr.fwht_reference(x)
    h = small_hadamard(1, torch.float64)
    for geometry in CACHE_GEOMETRIES:
        out = x.clone()
        native.fwht(out, out, 1 << 18, h, 1 / 512, 1, isa, *geometry)
        torch.testing.assert_close(out, truth, rtol=1e-12, atol=1e-12)


def test_the_binding_refuses_partly_overlapping_or_misaligned_buffers():
    """Only the sizes used to be compared: a dst 4 elements past src transformed wrong without a word, and a
    float32 buffer at an odd address reached the kernels' typed loads."""
    import numpy as np

    h = np.ones((1, 1))
    memory = np.random.default_rng(0).standard_normal(20)
    with pytest.raises(ValueError, match="src and dst overlap without being the same buffer"):
        native.fwht(memory[:16], memory[4:], 16, h, 1.0, 1)
    native.fwht(memory[:16], memory[:16], 16, h, 1.0, 1)  # in place is fine
    odd = np.frombuffer(bytearray(8 * 4 + 1), dtype=np.float32, offset=1)
    with pytest.raises(ValueError, match="aligned to the element size"):
        native.fwht(odd, odd, 8, np.ones((1, 1), np.float32), 1.0, 1)


def test_the_binding_refuses_a_hadamard_factor_inside_dst():
    """The plan reads a dense H_m while the transform writes dst: a matrix inside dst was overwritten midway
    (max error 30.7, a fuzzing helper found)."""
    import numpy as np

    rng = np.random.default_rng(0)
    h = rng.choice([-1.0, 1.0], size=(12, 12)).astype(np.float32)  # not Paley: used as the dense matrix
    x = rng.standard_normal(96).astype(np.float32)
    memory = np.zeros(96 + 144, np.float32)
    inside = memory[72:216].reshape(12, 12)
    inside[:] = h
    with pytest.raises(ValueError, match="hadamard_m overlaps dst"):
        native.fwht(x, memory[:96], 24, inside, 1.0, 1)
    apart = np.empty_like(x)
    native.fwht(x, apart, 24, h, 1.0, 1)  # the same matrix elsewhere
    dense = np.kron(h, np.array([[1.0, 1.0], [1.0, -1.0]], np.float32))  # H_m kron H_2
    np.testing.assert_allclose(apart, (dense @ x.reshape(4, 24).T).T.reshape(-1), rtol=1e-5, atol=1e-4)


def test_a_huge_thread_count_is_capped():
    """Threads sharing one long row used to be started as asked: 2**31 - 1 made libgomp abort the process
    ('Out of memory allocating 463856469096 bytes'), 100000 crashed it (run in a child, which would die)."""
    import subprocess

    program = ("import math, torch; from dreidel._native import native; import dreidel as dr\n"
               "x = torch.randn(1, 1 << 15); out = x.clone()\n"
               "native.fwht(out, out, 1 << 15, torch.ones(1, 1), 1.0, 2**31 - 1)\n"
               "assert torch.allclose(out, dr.fwht_reference(x, normalized=False), rtol=1e-4, atol=1e-3)\n")
    child = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]


def test_fwht_at_refuses_a_byte_count_past_64_bits():
    """rows * n elements fitting 64 bits passed the guard though their bytes did not (signed overflow, UB)."""
    h = small_hadamard(1, torch.float32)
    x = torch.zeros(8)
    with pytest.raises(ValueError, match="overflow 64 bits of bytes"):
        native.fwht_at(x.data_ptr(), x.data_ptr(), 2**61, 1, h.data_ptr(), 1, 1.0, 1, False)


def test_cache_geometry_override_is_checked():
    h = small_hadamard(1, torch.float32)
    with pytest.raises(ValueError, match="l2_bytes"):
        native.fwht(torch.zeros(8), torch.zeros(8), 8, h, 1.0, 1, "auto", -2, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_threads", [2, 3, 4, 6, 16], indirect=True)
@pytest.mark.parametrize("n", [1 << 13, 1 << 15, 1 << 17, 1 << 19, 12 << 16, 1 << 20, 1 << 22])
def test_threads_inside_one_row_at_any_thread_count(n, num_threads, dtype, generator):
    # One row, several threads: the row is split among them (a count that is not a power of two once
    # produced blocks of a non-power-of-two length).
    x = torch.randn(1, n, dtype=torch.float64, generator=generator)
    out = dr.fwht(x.to(dtype))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), dr.fwht_reference(x), rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("n", [1 << 24, 28 << 20])
def test_very_long_single_row(n, num_threads, generator):
    x = torch.randn(1, n, generator=generator)
    torch.testing.assert_close(dr.fwht(x).double(), dr.fwht_reference(x.double()), rtol=1e-4, atol=1e-4)


def test_threads_do_not_change_the_result(generator):
    x = torch.randn(64, 4096, generator=generator)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dr.fwht(x)
        torch.set_num_threads(2)
        two = dr.fwht(x)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2])
def test_any_dim(dim, generator):
    x = torch.randn(8, 12, 16, dtype=torch.float64, generator=generator)
    if not dr.is_hadamard_length(x.shape[dim]):
        pytest.skip("length not supported along this dim")
    y = dr.fwht(x, dim=dim)
    assert y.shape == x.shape
    torch.testing.assert_close(y, dense_fwht(x, dim=dim))


def dense_fwht_dims(x: torch.Tensor, dims: tuple[int, ...], normalized: bool = True) -> torch.Tensor:
    """The multidimensional oracle: the Kronecker product of the dims' Hadamard matrices, one dense float64 product
    over all of them at once (not the transform along each in turn)."""
    dims = tuple(d % x.dim() for d in dims)
    rest = [d for d in range(x.dim()) if d not in dims]
    moved = x.double().permute(*rest, *dims)
    h = torch.ones(1, 1, dtype=torch.float64)
    for d in dims:
        h = torch.kron(h, dr.hadamard_matrix(x.shape[d]))
    y = moved.reshape(*moved.shape[: len(rest)], -1) @ h.T
    if normalized:
        y = y / math.sqrt(h.shape[0])
    return y.reshape(moved.shape).permute(*torch.argsort(torch.tensor(rest + list(dims))).tolist())


SEVERAL_DIMS = [((3, 8, 16), (-2, -1)), ((3, 8, 16), (2, 1)), ((12, 5, 4), [0, 2]), ((4, 20, 8, 2), (0, 1, 3)),
                ((6, 8), torch.Size([1])), ((2, 28, 3, 12), (3, 1))]


@pytest.mark.parametrize(("shape", "dims"), SEVERAL_DIMS)
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("inplace", [False, True])
def test_several_dims_give_the_multidimensional_transform(shape, dims, normalized, inplace, num_threads, generator):
    x = torch.randn(shape, dtype=torch.float64, generator=generator)
    want = dense_fwht_dims(x, tuple(dims), normalized)
    torch.testing.assert_close(dr.fwht_reference(x, dim=dims, normalized=normalized), want)
    for view in (x.clone(), x.clone().transpose(0, -1).contiguous().transpose(0, -1)):  # contiguous, transposed
        out = dr.fwht(view, dim=dims, normalized=normalized, inplace=inplace)
        assert (out is view) == inplace and out.shape == x.shape
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12 * math.sqrt(x.numel()))


def test_several_dims_differentiate_and_round_low_precision_once(generator):
    x = torch.randn(4, 8, 12, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dr.fwht(t, dim=(1, 2)), (x,))
    assert torch.autograd.gradcheck(lambda t: dr.fwht(t, dim=(0, 2), normalized=False), (x,))
    for dtype in (torch.bfloat16, torch.float16):  # computed in float32 over both dims, rounded once
        y = torch.randn(2, 16, 384, generator=generator).to(dtype)
        once = dr.fwht(y.float(), dim=(1, 2)).to(dtype)
        assert torch.equal(dr.fwht(y, dim=(1, 2)), once)
        assert torch.equal(dr.fwht_reference(y, dim=(1, 2)), dr.fwht_reference(y.float(), dim=(1, 2)).to(dtype))
        torch.testing.assert_close(once, dense_fwht_dims(y.float(), (1, 2)).to(dtype), rtol=0.02, atol=0.02)
        z = y.clone()
        assert dr.fwht(z, dim=(1, 2), inplace=True) is z and torch.equal(z, once)
        with pytest.raises(RuntimeError, match="cannot be differentiated"):
            dr.fwht(y.clone().requires_grad_(), dim=(1, 2), inplace=True)
        w = y.clone().requires_grad_()
        dr.fwht(w, dim=(1, 2)).float().pow(2).sum().backward()
        assert w.grad.dtype == dtype


def test_no_dims_transform_nothing():
    x = torch.randn(3, 5)  # 3 and 5 are no Hadamard lengths: nothing is transformed, nothing checked
    out = dr.fwht(x, dim=())
    assert torch.equal(out, x) and out is not x
    assert dr.fwht(x, dim=(), inplace=True) is x
    with pytest.raises(RuntimeError, match="cannot be differentiated"):  # refused as torch's leaf.add_(0) is
        dr.fwht(x.clone().requires_grad_(), dim=(), inplace=True)
    assert torch.equal(dr.fwht_reference(x, dim=[]), x) and dr.fwht_reference(x, dim=[]) is not x
    with pytest.raises(TypeError, match="torch.Tensor"):
        dr.fwht([1.0], dim=())


def test_bad_dim_sequences_are_refused_before_anything_is_transformed():
    x = torch.randn(8, 3, 16)
    for fn in (dr.fwht, dr.fwht_reference):
        with pytest.raises(ValueError, match=r"distinct dimensions, got \(2, -1\)"):
            fn(x, dim=(2, -1))
        with pytest.raises(ValueError, match="dimension 1 has length 3"):
            fn(x, dim=(0, 1))
        with pytest.raises(ValueError, match="dim=3 is out of range"):
            fn(x, dim=[0, 3])
        with pytest.raises(TypeError, match="each entry of dim must be an int, got bool"):
            fn(x, dim=(True, 2))
        with pytest.raises(TypeError, match="each entry of dim must be an int, got tuple"):
            fn(x, dim=((0, 2),))
        with pytest.raises(TypeError, match="dim must be an int or a tuple of ints, got float"):
            fn(x, dim=2.0)
    with pytest.raises(TypeError, match="dim must be an int, got tuple"):  # one dim only: it pads one
        dr.pad_to_hadamard(x, dim=(0, 1))
    y = x.clone()
    with pytest.raises(ValueError, match="dimension 1 has length 3"):
        dr.fwht(y, dim=(2, 0, 1), inplace=True)  # dims 2 and 0 would go first: none may
    assert torch.equal(y, x)


# (rows, n, columns): one pass, two (a small L2, long columns; the stages across blocks recursively two again
# for n = 2^14), H_m mixes (12, 20, 28), a rest of columns narrower than a register (17, 40, 5, 3), n of 1 and 2,
# rows enough for threads to take whole rows (7).
INTERLEAVED_PROBLEMS = [(3, 8, 16), (2, 12, 17), (1, 1024, 48), (2, 4096, 16), (1, 1 << 14, 16), (1, 20 * 64, 40),
                        (3, 2, 5), (1, 28, 3), (2, 1, 7), (7, 24, 80)]


@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry", [(-1, -1), (64 << 10, -1)], ids=["this_cpu", "l2_64k"])
def test_interleaved_transforms_match_the_reference(isa, dtype, geometry):
    # interleave=c: each of `rows` blocks of n rows of c values transformed along its n, every column where it
    # lies (a dimension of a contiguous tensor other than the last), in or out of place, at 1 to 3 threads.
    tolerance = 2e-5 if dtype == torch.float32 else 1e-12
    for rows, n, columns in INTERLEAVED_PROBLEMS:
        x = torch.randn(rows, n, columns, dtype=dtype, generator=torch.Generator().manual_seed(n + columns))
        truth = dr.fwht_reference(x.double(), dim=1)
        h = small_hadamard(dr.algo.hadamard_factor(n)[0], dtype)
        for threads, inplace in ((1, False), (2, True), (3, False)):
            out = x.clone() if inplace else torch.full_like(x, float("nan"))
            native.fwht((out if inplace else x).view(-1), out.view(-1), n, h, 1 / math.sqrt(n), threads, isa,
                        *geometry, interleave=columns)
            torch.testing.assert_close(out.double(), truth, rtol=tolerance, atol=tolerance,
                                       msg=lambda m: f"{(rows, n, columns)}, {threads} threads: {m}")


def test_interleave_is_checked_by_the_bindings():
    h = small_hadamard_array(1, torch.float32)
    x = torch.zeros(4, 8, 6)
    with pytest.raises(ValueError, match="interleave must be at least 1"):
        native.fwht(x.view(-1), x.view(-1), 8, h, 1.0, 1, interleave=0)
    with pytest.raises(ValueError, match="multiple of n \\* interleave"):
        native.fwht(x.view(-1), x.view(-1), 8, h, 1.0, 1, interleave=5)
    with pytest.raises(ValueError, match="interleave must be at least 1"):
        native.fwht_at(x.data_ptr(), x.data_ptr(), 4, 8, h.ctypes.data, 1, 1.0, 1, False, 0)
    with pytest.raises(ValueError, match="overflow 64 bits"):
        native.fwht_at(x.data_ptr(), x.data_ptr(), 4, 8, h.ctypes.data, 1, 1.0, 1, False, 1 << 62)


# (shape, make, dim, interleave): the kernel reads a dense tensor where it lies along any dimension whose stride
# is a whole number of cache lines (or 1); other layouts go through a contiguous copy (interleave 1).
DENSE_LAYOUTS = [
    ((4, 64, 16), lambda t: t, 1, 16),
    ((128, 32), lambda t: t, 0, 32),
    ((2, 12, 4, 48), lambda t: t, 1, 192),
    ((64, 32), lambda t: t.t(), 1, 32),  # a transpose: dense, its last dim 32 apart
    ((2, 12, 4, 8), lambda t: t.contiguous(memory_format=torch.channels_last), 1, 1),  # channels 1 apart
    ((2, 12, 4, 8), lambda t: t.contiguous(memory_format=torch.channels_last), 2, 96),
    ((2, 12, 4, 8), lambda t: t.contiguous(memory_format=torch.channels_last), 3, None),  # 12 apart: copied
    ((4, 64, 12), lambda t: t, 1, None),  # 12 apart: copied
    ((4, 64, 32), lambda t: t[:, :, :16], 1, None),  # not dense: copied
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(("shape", "make", "dim", "interleave"), DENSE_LAYOUTS)
def test_a_dimension_other_than_the_last_is_transformed_where_it_lies(shape, make, dim, interleave, inplace,
                                                                      dtype, num_threads, monkeypatch, generator):
    recorder = _RecordingNative()
    monkeypatch.setattr(fwht_module, "native", recorder)
    x = make(torch.randn(shape, dtype=dtype, generator=generator))
    truth = dense_fwht(x, dim=dim)
    y = dr.fwht(x, dim=dim, inplace=inplace)
    torch.testing.assert_close(y.double(), truth, rtol=1e-12 if dtype == torch.float64 else 2e-5, atol=2e-5)
    if interleave is None:
        assert all(i == 1 for i in recorder.interleaves)
        return
    assert recorder.interleaves == [interleave]
    assert y.stride() == x.stride()  # out of place too: the result has the input's layout
    assert (y is x) == inplace


@pytest.mark.parametrize("n", [16, 384])
def test_dimensions_read_in_place_agree_bitwise_on_every_path(n, generator):
    # The direct kernel call, the autograd path, the custom op (torch.compile's, contiguous) and the backward.
    x = torch.randn(3, n, 32, generator=generator, requires_grad=True)
    recorded = dr.fwht(x, dim=1)
    with torch.no_grad():
        direct = dr.fwht(x, dim=1)
    op = _fwht_op(x.movedim(1, -1), True).movedim(-1, 1)
    assert torch.equal(recorded, direct) and torch.equal(recorded, op)
    assert recorded.stride() == x.stride()
    (grad,) = torch.autograd.grad(recorded, x, torch.ones_like(recorded))
    assert torch.equal(grad, dr.fwht(torch.ones_like(x), dim=1))


def test_float32_error_rule_holds_along_a_dimension_read_in_place(generator):
    x = torch.randn(8, 4096, 64, generator=generator)
    exact = dr.fwht_reference(x.double(), dim=1)
    error = (dr.fwht(x, dim=1).double() - exact).abs().max()
    reference_error = (dr.fwht_reference(x, dim=1).double() - exact).abs().max()
    assert error <= 2 * reference_error


@pytest.mark.parametrize(
    "make_view",
    [
        lambda t: t.T,  # transposed
        lambda t: t[:, ::2],  # strided columns
        lambda t: t[::3],  # strided rows
        lambda t: t.unsqueeze(1).expand(-1, 2, -1)[:, 1],  # stride-0 broadcast dim
    ],
    ids=["transposed", "col-step", "row-step", "expanded"],
)
def test_non_contiguous_input(make_view, generator):
    base = torch.randn(64, 64, dtype=torch.float64, generator=generator)
    view = make_view(base)
    before = base.clone()
    torch.testing.assert_close(dr.fwht(view), dense_fwht(view.contiguous()))
    assert torch.equal(base, before), "out-of-place fwht must not touch its input"


@pytest.mark.parametrize("n", [8, 384, 4096])
def test_inplace_matches_out_of_place(n, generator):
    x = torch.randn(4, n, generator=generator)
    expected = dr.fwht(x)
    result = dr.fwht(x, inplace=True)
    assert result is x
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


def test_inplace_on_a_strided_view_writes_through(generator):
    base = torch.randn(16, 32, dtype=torch.float64, generator=generator)
    expected = base.clone()
    expected[:, ::2] = dense_fwht(base[:, ::2], dim=0)
    dr.fwht(base[:, ::2], dim=0, inplace=True)
    torch.testing.assert_close(base, expected)


@pytest.mark.parametrize("make_view", [
    lambda b: b.as_strided((4, 8), (2, 1)),  # rows overlap
    lambda b: b.unfold(0, 8, 1),
    lambda b: b[:8].expand(4, 8),
    lambda b: b.as_strided((2, 4, 4), (16, 2, 4)),  # 2 * 2 = 4 * 1: offsets repeat
])
def test_inplace_refuses_a_view_whose_elements_share_memory(make_view, generator):
    base = torch.randn(40, generator=generator)
    before = base.clone()
    view = make_view(base)
    with pytest.raises(RuntimeError, match="share memory"):
        dr.fwht(view, inplace=True)
    assert torch.equal(base, before)
    dr.fwht(view.clone(), inplace=True)  # a copy is fine


def test_inplace_refuses_a_huge_expanded_view_without_enumerating_it():
    # 2^40 elements over one value: a table of their offsets (8 TB) used to be built before the refusal.
    view = torch.ones(1).expand(1 << 20, 1 << 20)
    with pytest.raises(RuntimeError, match="share memory"):
        dr.fwht(view, inplace=True)


def test_inplace_takes_views_with_interleaved_strides(generator):
    # Offsets {0, 2, 4} + {0, 3}: no two elements meet, though no stride passes the reach of the other.
    base = torch.randn(16, dtype=torch.float64, generator=generator)
    view = base.as_strided((3, 2), (2, 3)).t()  # (2, 3): transform the dim of length 2
    expected = dense_fwht(view.contiguous(), dim=0)
    dr.fwht(view, dim=0, inplace=True)
    torch.testing.assert_close(view, expected)


def test_inplace_carries_a_forward_mode_tangent(generator):
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(16, 12, dtype=torch.float64, generator=generator)
    tangent = torch.randn(16, 12, dtype=torch.float64, generator=generator)
    for dim in (-1, 0):
        with fwAD.dual_level():
            dual = fwAD.make_dual(x.clone(), tangent.clone())
            assert dr.fwht(dual, dim=dim, inplace=True) is dual
            primal, jvp = fwAD.unpack_dual(dual)
        torch.testing.assert_close(primal, dense_fwht(x, dim=dim))
        torch.testing.assert_close(jvp, dense_fwht(tangent, dim=dim))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_inplace_on_a_negated_low_precision_view(dtype, generator):
    x = torch.randn(4, 16, generator=generator).to(dtype)
    original = x.clone()
    negated = torch._neg_view(x)
    dr.fwht(negated, inplace=True)  # the view now holds H(-x), so x itself holds H x
    torch.testing.assert_close(x, dr.fwht(original))


@pytest.mark.parametrize("flags", [{"normalized": None}, {"normalized": "False"}, {"normalized": 1},
                                   {"inplace": "False"}, {"inplace": 0}])
def test_flags_must_be_bools(flags):
    x = torch.randn(2, 8)
    before = x.clone()
    name = next(iter(flags))
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        dr.fwht(x, **flags)
    assert torch.equal(x, before)
    if name == "normalized":
        with pytest.raises(TypeError, match="normalized must be a bool"):
            dr.fwht_reference(x, **flags)


def test_inplace_refuses_autograd():
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="inplace"):
        dr.fwht(x, inplace=True)
    with torch.no_grad():
        dr.fwht(x, inplace=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_low_precision_computed_in_float32(dtype, inplace, generator):
    x = torch.randn(4, 384, generator=generator).to(dtype)
    expected = dr.fwht(x.float()).to(dtype)
    y = dr.fwht(x.clone() if inplace else x, inplace=inplace)
    assert y.dtype == dtype
    assert torch.equal(y, expected)


@pytest.mark.parametrize("n", [8, 12, 40, 56])
@pytest.mark.parametrize("normalized", [True, False])
def test_gradcheck(n, normalized, generator):
    x = torch.randn(3, n, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dr.fwht(t, dim=-1, normalized=normalized), (x,))
    assert torch.autograd.gradgradcheck(lambda t: dr.fwht(t, normalized=normalized), (x,))


@pytest.mark.parametrize("columns", [3, 8])  # 8 float64 values apart: read in place; 3: through a copy
def test_gradcheck_along_inner_dim(columns, generator):
    x = torch.randn(4, 12, columns, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dr.fwht(t, dim=1), (x,))


def test_normalized_transform_is_an_involution(generator):
    for n in (1024, 384, 1280, 1792):
        x = torch.randn(3, n, dtype=torch.float64, generator=generator)
        torch.testing.assert_close(dr.fwht(dr.fwht(x)), x)


@pytest.mark.parametrize("shape", [(3, 64), (2, 3, 384), (5, 1)])
def test_opcheck(shape, generator):
    x = torch.randn(*shape, generator=generator)
    torch.library.opcheck(_fwht_op, (x, True))
    torch.library.opcheck(_fwht_op, (x.double().requires_grad_(), False))
    torch.library.opcheck(_fwht_inplace_op, (x.clone(), True))


def test_meta_tensors_give_shapes_without_compute():
    y = dr.fwht(torch.empty(4, 7, 384, device="meta"), dim=-1)
    assert y.shape == (4, 7, 384) and y.device.type == "meta"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_compile_in_place_in_low_precision_has_no_graph_break(dtype, generator):
    def transform(t):
        dr.fwht(t, dim=0, inplace=True)
        return t * 1

    x = torch.randn(8, 16, generator=generator).to(dtype)
    expected = transform(x.clone())
    torch.testing.assert_close(torch.compile(transform, fullgraph=True)(x.clone()), expected, rtol=0, atol=0)


def test_torch_compile_in_place(generator):
    x = torch.randn(5, 16, generator=generator)
    expected = dense_fwht(x).float()
    compiled = torch.compile(lambda t: dr.fwht(t, inplace=True), fullgraph=True)
    assert compiled(x) is x
    torch.testing.assert_close(x, expected)


@pytest.mark.parametrize("make_view", [lambda b: b.unfold(0, 8, 4), lambda b: b[:8].expand(3, 8)])
def test_torch_compile_in_place_refuses_a_view_whose_elements_share_memory(make_view, generator):
    """Compiled, an unfold view used to be accepted and written wrong (eager refuses it)."""
    base = torch.randn(40, generator=generator)
    before = base.clone()
    compiled = torch.compile(lambda t: dr.fwht(t, inplace=True), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception) as raised:  # dynamo wraps the RuntimeError raised while tracing
        compiled(make_view(base))
    chain, error = [], raised.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__
    assert any("share memory" in text for text in chain), chain
    assert torch.equal(base, before)


def test_torch_compile_in_place_on_an_ordinary_view(generator):
    base = torch.randn(16, 32, dtype=torch.float64, generator=generator)
    expected = base.clone()
    expected[:, 1::2] = dense_fwht(base[:, 1::2], dim=0)
    compiled = torch.compile(lambda t: dr.fwht(t, dim=0, inplace=True), backend="aot_eager", fullgraph=True)
    compiled(base[:, 1::2])
    torch.testing.assert_close(base, expected)


@pytest.mark.parametrize("shape, normalized", [((3, 1), False), ((3, 1), True), ((), False), ((), True),
                                               ((0, 4), False)])
def test_reference_and_the_ops_default_kernel_return_new_memory(shape, normalized, generator):
    """With no stage to run (a length of 1, unnormalized) the reference returned a view of x, and the op's
    default kernel (what other devices run), which torch.library forbids to alias its input, raised; on a 0-d
    tensor it raised IndexError."""
    x = torch.randn(shape, generator=generator)
    expected = dense_fwht(x.reshape(-1, x.shape[-1] if x.dim() else 1), normalized=normalized).reshape(shape).float()
    y = dr.fwht_reference(x, normalized=normalized)
    torch.testing.assert_close(y, expected)
    if x.numel():
        assert y.data_ptr() != x.data_ptr()
    default_kernel = torch.ops.dreidel.fwht.default.redispatch(
        torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd), x, normalized)
    torch.testing.assert_close(default_kernel, expected)


def test_torch_compile(generator):
    x = torch.randn(8, 256, generator=generator, requires_grad=True)
    compiled = torch.compile(lambda t: torch.relu(dr.fwht(t * 2.0)).sum(), fullgraph=True)
    loss = compiled(x)
    loss.backward()
    expected_grad = dr.fwht((dr.fwht(x.detach() * 2.0) > 0).float()) * 2.0
    torch.testing.assert_close(loss, torch.relu(dr.fwht(x.detach() * 2.0)).sum())
    torch.testing.assert_close(x.grad, expected_grad)


def test_torch_compile_of_torch_func_transforms(generator):
    """Under compile and vmap/grad the transform runs the reference's ops; for m > 1 their H_m factor was built on
    first use behind a mode guard, a graph break that sent the kernel's frames to Dynamo, which failed on the next
    batch size (symbolic sizes)."""
    n = 24  # m = 12
    batched = torch.compile(torch.func.vmap(dr.fwht))
    whole = torch.compile(torch.func.vmap(dr.fwht), fullgraph=True)
    for rows in (5, 7):
        x = torch.randn(rows, n, generator=generator)
        torch.testing.assert_close(batched(x), dr.fwht_reference(x))
        torch.testing.assert_close(whole(x), dr.fwht_reference(x))
    gradient = torch.compile(torch.func.grad(lambda t: dr.fwht(t).pow(3).sum()))
    for length in (n, 2 * n):
        x = torch.randn(length, generator=generator)
        torch.testing.assert_close(gradient(x), 3 * dr.fwht_reference(dr.fwht_reference(x) ** 2))


def test_the_hadamard_factors_do_not_take_the_state_of_their_first_caller():
    """Built on first use, the m x m factor became an inference tensor when that use was under inference mode, and
    fwht_reference could no longer be differentiated in that process (run in a child: a fresh process)."""
    import subprocess

    program = ("import torch, dreidel as dr\n"
               "with torch.inference_mode():\n"
               "    dr.fwht(torch.randn(2, 384))\n"
               "x = torch.randn(2, 384, requires_grad=True)\n"
               "dr.fwht_reference(x).sum().backward()\n"
               "assert torch.allclose(x.grad, dr.fwht(torch.ones(2, 384)))\n")
    child = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]


def test_nan_and_inf_propagate_like_the_dense_product():
    x = torch.zeros(4, 16, dtype=torch.float64)
    x[0, 3] = float("nan")
    x[1, 0] = float("inf")
    x[2, 0] = float("inf")
    x[2, 1] = float("inf")
    x[3, 5] = float("-inf")
    got = dr.fwht(x, normalized=False)
    # The dense product written as sums of +-x_j, which is what H x means for non-finite entries.
    h = dr.hadamard_matrix(16)
    expected = torch.stack([(h * row).nansum(-1) if not row.isnan().any() else torch.full((16,), float("nan"),
                            dtype=torch.float64) for row in x])
    expected[2] = torch.where(h[:, 0] * h[:, 1] < 0, float("nan"), float("inf"))
    torch.testing.assert_close(got, expected, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8])
def test_rejects_non_real_float_dtypes(dtype):
    with pytest.raises(TypeError, match="floating-point"):
        dr.fwht(torch.zeros(2, 8, dtype=dtype))


def test_rejects_unsupported_length_with_nearest_lengths():
    with pytest.raises(ValueError) as info:
        dr.fwht(torch.zeros(2, 100), dim=1)
    message = str(info.value)
    for fragment in ("dimension 1", "length 100", "96", "112", "pad_to_hadamard"):
        assert fragment in message


SUBNORMAL_LENGTHS = [2, 4, 8, 64, 128, 1024, 4096, 12, 20, 28, 96, 384, 1536, 12 << 10, 1 << 14, 1 << 17, 20 << 12]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", SUBNORMAL_LENGTHS)
def test_subnormal_inputs_are_summed_before_they_are_scaled(n, dtype, num_threads, generator):
    """Small multiples of the smallest subnormal: every +-1 sum is exact, so the normalized transform is one
    rounding of each scaled sum, as the reference computes it. Scaling the inputs first rounded them on the
    subnormal grid before summing (Gaussian float32 values of 1e-40, n = 4096: 109x the reference's error)."""
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # the smallest subnormal
    units = torch.randint(-255, 256, (3, n), generator=generator, dtype=torch.int64)
    x = units.to(dtype) * tiny
    assert (x.abs() < torch.finfo(dtype).smallest_normal).all()
    exact = dr.fwht_reference(units.double(), normalized=False)  # the integer sums, exactly
    expected = (exact.to(dtype) * tiny) * dr.algo._fwht._scale(n, True)
    torch.testing.assert_close(dr.fwht_reference(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(dr.fwht(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(dr.fwht(x.clone(), inplace=True), expected, rtol=0, atol=0)


@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("geometry", [(512 << 10, 8), (2 << 20, 12)], ids=["l1_8way", "l1_12way"])
@pytest.mark.parametrize(("rows", "n"), [(2, 1 << 20), (1, 12 << 16), (3, 1 << 15)])
def test_subnormal_inputs_of_long_rows_on_every_isa_and_cache_geometry(isa, geometry, rows, n, generator):
    # The passes of a long row split its stages over several calls of the kernels: only the last may scale.
    tiny = torch.finfo(torch.float32).smallest_normal * torch.finfo(torch.float32).eps
    x = torch.randint(-255, 256, (rows, n), generator=generator).float() * tiny
    h = small_hadamard(dr.algo.hadamard_factor(n)[0], torch.float32)
    expected = dr.fwht_reference(x)
    for threads in (1, 2, 3):
        out = torch.empty_like(x)
        native.fwht(x, out, n, h, dr.algo._fwht._scale(n, True), threads, isa, *geometry)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("n", [1 << 12, 1 << 17, 384])
def test_float32_error_rule_holds_on_subnormal_gaussian_inputs(n, num_threads, generator):
    # Gaussian values of 1e-40: sums that leave the subnormal range for normal floats as n grows.
    x64 = torch.randn(8, n, dtype=torch.float64, generator=generator) * 1e-40
    x = x64.float()
    truth = dr.fwht_reference(x.double())
    native_err = (dr.fwht(x).double() - truth).abs().max().item()
    reference_err = (dr.fwht_reference(x).double() - truth).abs().max().item()
    assert native_err <= 2 * reference_err


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("n", [12, 20, 28, 32, 128, 160, 384, 640, 2048, 2560, 4096, 6144, 1 << 14])
def test_float32_error_rule_holds_on_constant_and_alternating_rows(n, normalized):
    """Structured rows, where roundings do not cancel: scaling the inputs first put each input's rounding into
    every sum (a constant row of 32: 10x the reference's error), and float32 sums in the scalar H_m mix gave
    3x at n = 20."""
    value = torch.tensor(1.2345678)
    rows = torch.stack([value.expand(n), value * torch.tensor([1.0, -1.0]).repeat(n // 2),
                        value * torch.tensor([1.0, 1.0, -1.0, 1.0]).repeat(n // 4 + 1)[:n]])
    truth = dr.fwht_reference(rows.double(), normalized=normalized)
    native_err = (dr.fwht(rows, normalized=normalized).double() - truth).abs().max().item()
    reference_err = (dr.fwht_reference(rows, normalized=normalized).double() - truth).abs().max().item()
    assert native_err <= 2 * reference_err


@pytest.mark.parametrize("n", [12, 20, 28, 24, 40, 56])
def test_float32_error_rule_over_many_batches_of_short_composite_rows(n):
    """n = m * 2^k with k <= 3: few stages before the H_m mix, where scaling the inputs first (instead of the
    sums, as the reference does) broke the rule in about 1 in 200 batches; checked against exact sums."""
    h = dr.hadamard_matrix(n)  # float64: the +-1 sums of float32 inputs are exact in it
    for seed in range(200):
        x = torch.randn(32, n, generator=torch.Generator().manual_seed(seed))
        truth = (x.double() @ h) / math.sqrt(n)
        native_err = (dr.fwht(x).double() - truth).abs().max().item()
        reference_err = (dr.fwht_reference(x).double() - truth).abs().max().item()
        assert native_err <= 2 * reference_err, seed


def test_rejects_bad_dim_and_non_tensors():
    with pytest.raises(ValueError, match="dim=2"):
        dr.fwht(torch.zeros(2, 8), dim=2)
    for bad in (True, 1.0, "1"):
        with pytest.raises(TypeError, match="dim must be an int"):
            dr.fwht(torch.zeros(2, 8), dim=bad)
        with pytest.raises(TypeError, match="dim must be an int"):
            dr.fwht_reference(torch.zeros(2, 8), dim=bad)
    numpy = pytest.importorskip("numpy")
    x = torch.randn(8, 3)
    assert torch.equal(dr.fwht(x, dim=numpy.int64(0)), dr.fwht(x, dim=0))
    with pytest.raises(ValueError, match="dim=1 .* 0-d"):
        dr.fwht(torch.tensor(1.0), dim=1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        dr.fwht([1.0, 2.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("dim", [0, -1])
def test_a_scalar_is_a_vector_of_length_one(dtype, dim):
    x = torch.tensor(-2.5, dtype=dtype, requires_grad=True)
    for normalized in (True, False):  # H_1 = [1], 1/sqrt(1) = 1: the identity either way
        y = dr.fwht(x, dim=dim, normalized=normalized)
        assert y.shape == () and y.dtype == dtype and y.item() == -2.5
        assert dr.fwht_reference(x, dim=dim, normalized=normalized).item() == -2.5
    y.backward()
    assert x.grad.item() == 1.0
    z = x.detach().clone()
    assert dr.fwht(z, dim=dim, inplace=True) is z and z.item() == -2.5


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_rejects_float8_as_a_dtype_error(dtype):
    with pytest.raises(TypeError, match="float32, float64, float16, bfloat16"):
        dr.fwht(torch.ones(4).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contiguous_tensors_off_their_element_alignment(dtype, generator):
    """torch.frombuffer at an odd byte offset makes contiguous tensors the kernel must not take as they are."""
    values = torch.randn(3, 16, dtype=dtype, generator=generator)
    raw = bytearray(1) + bytearray(values.numpy().tobytes())
    x = torch.frombuffer(raw, dtype=dtype, offset=1, count=48).view(3, 16)
    assert x.is_contiguous() and x.data_ptr() % x.element_size() != 0
    torch.testing.assert_close(dr.fwht(x), dense_fwht(values).to(dtype))
    assert dr.fwht(x, inplace=True) is x
    torch.testing.assert_close(x, dense_fwht(values).to(dtype))
    with pytest.raises(ValueError, match="fwht_into: src's address is not aligned to its element size"):
        dr.algo.fwht_into(x, torch.empty(3, 16, dtype=dtype))


def test_in_place_on_an_inference_tensor_follows_torch():
    with torch.inference_mode():
        x = torch.ones(2, 8)
    with pytest.raises(RuntimeError, match="inference"):
        x.mul_(1.0)  # torch's own rule, which the kernel's direct write must not bypass
    for view in (x, x.t()):  # the direct path and the general one
        with pytest.raises(RuntimeError, match="inference tensor"):
            dr.fwht(view, dim=view.dim() - 1 if view is x else 0, inplace=True)
    torch.testing.assert_close(x, torch.ones(2, 8))
    with torch.inference_mode():
        dr.fwht(x, inplace=True, normalized=False)
    torch.testing.assert_close(x, dense_fwht(torch.ones(2, 8), normalized=False).float())


@pytest.mark.parametrize("shape, dim", [((0, 8), -1), ((3, 0), -1), ((0,), 0), ((16, 0), 0), ((2, 16, 0, 3), 1)])
def test_empty_tensors_return_empty(shape, dim):
    x = torch.zeros(shape)
    y = dr.fwht(x, dim=dim)
    assert y.shape == x.shape and y is not x
    assert dr.fwht(x, dim=dim, inplace=True) is x
    for op in (torch.ops.dreidel.fwht, torch.ops.dreidel.fwht_):  # the registered ops, called directly
        op(x.movedim(dim, -1), True)


@pytest.mark.parametrize("dim", [-1, (0, 1)])
def test_empty_tensors_are_refused_in_place_where_any_in_place_op_is(dim):
    """An empty leaf that requires grad, and an empty inference tensor outside inference mode, were accepted in
    place (torch's own in-place ops refuse both; a user audit)."""
    leaf = torch.zeros(0, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        leaf.mul_(2.0)
    with pytest.raises(RuntimeError, match="cannot be differentiated: x requires grad"):
        dr.fwht(leaf, dim, inplace=True)
    with torch.inference_mode():
        frozen = torch.zeros(0, 16)
    with pytest.raises(RuntimeError, match="inference tensor"):
        dr.fwht(frozen, dim, inplace=True)


def test_an_overlapping_view_is_checked_under_a_meta_default_device():
    """The offset table of the overlap check was built on the default device: on meta it had no values."""
    view = torch.randn(40).as_strided((2, 4), (3, 2))  # strides alone do not settle whether it overlaps
    expected = dr.fwht(view.clone(), inplace=True)
    with torch.device("meta"):
        dr.fwht(view, inplace=True)
    torch.testing.assert_close(view, expected)


def test_an_unsupported_length_is_refused_even_when_there_is_nothing_to_transform():
    # dreidel.fwht checked the length first, but the registered ops returned the empty tensor.
    for transform in (lambda t: dr.fwht(t), lambda t: torch.ops.dreidel.fwht(t, True),
                      lambda t: torch.ops.dreidel.fwht_(t, True)):
        with pytest.raises(ValueError, match="length 3"):
            transform(torch.empty(0, 3))


def test_native_binding_validates_buffers():
    h = small_hadamard(1, torch.float32)
    with pytest.raises(ValueError, match="same number"):
        native.fwht(torch.zeros(8), torch.zeros(16), 8, h, 1.0, 1)
    with pytest.raises(ValueError, match="multiple of n"):
        native.fwht(torch.zeros(12), torch.zeros(12), 8, h, 1.0, 1)
    with pytest.raises(ValueError, match="m \\* 2\\^k"):
        native.fwht(torch.zeros(12), torch.zeros(12), 12, h, 1.0, 1)
    with pytest.raises(ValueError, match="isa"):
        native.fwht(torch.zeros(8), torch.zeros(8), 8, h, 1.0, 1, "sse9")
    with pytest.raises(TypeError):
        native.fwht(torch.zeros(8, dtype=torch.int32), torch.zeros(8, dtype=torch.int32), 8, h, 1.0, 1)


@pytest.mark.parametrize("n, target", [(100, 112), (384, 384), (1000, 1024), (5, 8), (1, 1)])
def test_pad_to_hadamard(n, target, generator):
    x = torch.randn(3, n, generator=generator)
    padded = dr.pad_to_hadamard(x, dim=1)
    assert padded.shape == (3, target)
    assert torch.equal(padded[:, :n], x) and not padded[:, n:].any()
    dr.fwht(padded, dim=1)


def test_pad_to_powers_of_two():
    assert dr.pad_to_hadamard(torch.zeros(2, 384), powers_of_two_only=True).shape == (2, 512)


@pytest.mark.parametrize("powers_of_two_only", [False, True])
def test_pad_to_hadamard_edges(powers_of_two_only):
    for x in (torch.zeros(3, 0), torch.tensor(2.0)):  # what fwht takes as it is: an empty dim, a 0-d "length 1"
        assert dr.pad_to_hadamard(x, powers_of_two_only=powers_of_two_only) is x
    longest = 2**30 if powers_of_two_only else 28 * 2**30
    too_long = torch.empty(longest + 1, device="meta")  # no memory: only the length matters
    # with powers_of_two_only it is the longest power of two (it said "supported length", though 28 * 2^30 is)
    message = r"longer than the longest power of two \(2\^30\)" if powers_of_two_only else "longest supported length"
    with pytest.raises(ValueError, match=message):
        dr.pad_to_hadamard(too_long, powers_of_two_only=powers_of_two_only)


@pytest.mark.parametrize("flag", ["no", 1, None])
def test_pad_to_hadamard_flag_must_be_a_bool(flag):
    with pytest.raises(TypeError, match="powers_of_two_only must be a bool"):
        dr.pad_to_hadamard(torch.randn(2, 5), powers_of_two_only=flag)  # "no" used to mean True


@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr", "nested"])
def test_rejects_sparse_and_nested_tensors(layout):
    dense = torch.randn(4, 8)
    x = {"sparse_coo": dense.to_sparse, "sparse_csr": dense.to_sparse_csr,
         "nested": lambda: torch.nested.nested_tensor([dense[0], dense[1]])}[layout]()
    with pytest.raises(TypeError, match="dense"):
        dr.fwht(x)


def sylvester_entries(rows: torch.Tensor, column: int) -> torch.Tensor:
    """H_{2^k}[i, j] = (-1)^popcount(i & j): a closed form independent of any butterfly."""
    bits = rows & column
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return 1.0 - 2.0 * parity.double()


@pytest.mark.parametrize(
    "log2_n", [20, 24, pytest.param(30, marks=pytest.mark.slow)], ids=lambda k: f"2^{k}"
)
def test_unit_vector_gives_a_hadamard_column_up_to_2_pow_30(log2_n, num_threads):
    n = 1 << log2_n
    column = (0b1011 << (log2_n - 5)) | 5
    x = torch.zeros(1, n)
    x[0, column] = 1.0
    dr.fwht(x, inplace=True, normalized=False)
    sample = torch.randint(0, n, (1 << 16,), generator=torch.Generator().manual_seed(log2_n))
    assert torch.equal(x[0, sample].double(), sylvester_entries(sample, column))
    assert bool((x.abs() == 1).all())  # every entry is exactly +-1


@pytest.mark.parametrize("n", [8, 384, 1 << 17])
def test_fwht_into_is_the_raw_kernel(n, generator):
    x = torch.randn(3, n, dtype=torch.float64, generator=generator)
    out = torch.empty_like(x)
    dr.algo.fwht_into(x, out, normalized=True)
    torch.testing.assert_close(out, dense_fwht(x) if n <= 4096 else dr.fwht_reference(x))
    dr.algo.fwht_into(x, x, normalized=False)
    torch.testing.assert_close(x, out * math.sqrt(n))


@pytest.mark.parametrize("n", [8, 384, 4096])
def test_eager_path_and_custom_op_agree_bitwise(n, generator):
    x = torch.randn(5, n, generator=generator, requires_grad=True)
    eager = dr.fwht(x)
    op = _fwht_op(x, True)
    assert torch.equal(eager, op)
    (grad_eager,) = torch.autograd.grad(eager.square().sum(), x)
    (grad_op,) = torch.autograd.grad(op.square().sum(), x)
    assert torch.equal(grad_eager, grad_op)


def test_address_binding_validates_its_arguments():
    h = small_hadamard_array(1, torch.float32)
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="m \\* 2\\^k"):
        native.fwht_at(x.data_ptr(), x.data_ptr(), 2, 12, h.ctypes.data, 1, 1.0, 1, False)
    with pytest.raises(ValueError, match="rows"):
        native.fwht_at(x.data_ptr(), x.data_ptr(), -1, 8, h.ctypes.data, 1, 1.0, 1, False)
    with pytest.raises(ValueError, match="non-null"):
        native.fwht_at(0, x.data_ptr(), 2, 8, h.ctypes.data, 1, 1.0, 1, False)
    with pytest.raises(ValueError, match="aligned"):
        native.fwht_at(x.data_ptr() + 1, x.data_ptr(), 2, 8, h.ctypes.data, 1, 1.0, 1, False)
    native.fwht_at(0, 0, 0, 8, 0, 1, 1.0, 1, False)  # nothing to transform: no address is read


@pytest.mark.parametrize(
    "src, dst, message",
    [
        (torch.zeros(3, 8), torch.zeros(3, 16), r"dst has shape \(3, 16\), src \(3, 8\)"),
        (torch.zeros(3, 8), torch.zeros(3, 8, dtype=torch.float64), "dst has dtype torch.float64, src torch.float32"),
        (torch.zeros(8, 3).t(), torch.zeros(3, 8), r"src is not contiguous \(call .contiguous\(\)\)"),
        (torch.zeros(3, 8), torch.zeros(8, 3).t(), "dst is not contiguous"),
        (torch.zeros(3, 10), torch.zeros(3, 10), "last dimension has length 10, which is not a supported"),
        (torch.zeros(3, 8, dtype=torch.float16), torch.zeros(3, 8, dtype=torch.float16), "src has dtype torch.float16"),
        (torch.zeros(()), torch.zeros(()), "src is 0-d"),
    ],
    ids=["shape", "dtype", "contiguity", "dst_contiguity", "length", "float16", "0-d"],
)
def test_fwht_into_rejects_what_the_kernel_cannot_take(src, dst, message):
    with pytest.raises(ValueError, match="fwht_into: .*" + message):
        dr.algo.fwht_into(src, dst)


def test_fwht_into_refuses_what_is_not_a_tensor_or_a_bool():
    with pytest.raises(TypeError, match="fwht_into: src and dst must be tensors, got list and list"):
        dr.algo.fwht_into([1.0, 2.0], [0.0, 0.0])
    x = torch.zeros(3, 8)
    with pytest.raises(TypeError, match="normalized must be a bool, got str 'no'"):  # as fwht refuses it
        dr.algo.fwht_into(x, x, normalized="no")


def test_fwht_into_follows_the_rules_of_in_place_ops():
    buffer = torch.randn(24)
    with pytest.raises(ValueError, match="overlap"):
        dr.algo.fwht_into(buffer[:16].view(2, 8), buffer[8:].view(2, 8))
    weight = torch.randn(2, 8, requires_grad=True)
    saved = torch.randn(2, 8)
    loss = (weight * saved).sum()  # saves `saved` for the gradient of weight
    dr.algo.fwht_into(torch.randn(2, 8), saved)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    leaf = torch.zeros(2, 8, requires_grad=True)
    # a leaf, a view of one (a review: it was written), a computed tensor (its gradient would be wrong)
    for dst in (leaf, leaf[0], leaf * 2):
        with pytest.raises(RuntimeError, match="dst requires grad, and fwht_into records nothing for autograd"):
            dr.algo.fwht_into(torch.randn(dst.shape), dst)
    assert not leaf.detach().any()
    with torch.no_grad():
        dr.algo.fwht_into(torch.ones(8), leaf[0])  # as torch's in-place ops, under no_grad it may be written
    assert leaf.detach()[0, 0] == 8 ** 0.5
    with torch.inference_mode():
        inference = torch.zeros(2, 8)
    with pytest.raises(RuntimeError, match="inference tensor"):
        dr.algo.fwht_into(torch.randn(2, 8), inference)
    assert not inference.any()  # refused before the kernel wrote anything


@pytest.mark.parametrize("n", [8, 384, 1 << 13])
def test_direct_kernel_path_agrees_with_the_autograd_path(n, generator):
    x = torch.randn(4, n, generator=generator, requires_grad=True)
    recorded = dr.fwht(x)
    with torch.no_grad():
        direct = dr.fwht(x)
    assert recorded.requires_grad and not direct.requires_grad
    assert torch.equal(recorded, direct)
    assert torch.equal(dr.fwht(x.detach()), direct)


def test_negative_views_are_not_read_as_raw_memory(generator):
    x = torch.randn(3, 64, generator=generator)
    original = x.clone()
    negated = torch._neg_view(x)
    assert negated.is_neg() and negated.is_contiguous()
    torch.testing.assert_close(dr.fwht(negated), -dr.fwht(original))
    with pytest.raises(ValueError, match=r"fwht_into: src is a lazily negated view \(call .resolve_neg\(\)\)"):
        dr.algo.fwht_into(negated, torch.empty_like(x))
    dr.fwht(negated, inplace=True)  # the view now holds H(-x), so x itself holds H x
    torch.testing.assert_close(x, dr.fwht(original))


def test_fwht_into_refuses_a_negated_destination():
    with pytest.raises(ValueError, match=r"dst is a lazily negated view \(call .resolve_neg\(\)\)"):
        dr.algo.fwht_into(torch.ones(3, 8), torch._neg_view(torch.zeros(3, 8)))


def test_fwht_into_names_tensors_without_memory_in_its_error():
    with pytest.raises(ValueError, match="fwht_into: .*src has no memory of its own"):
        dr.algo.fwht_into(torch.ones(4, 8).to_sparse(), torch.empty(4, 8))
    with pytest.raises(ValueError, match="fwht_into: .*src has no memory of its own"):
        torch.func.vmap(lambda t: dr.algo.fwht_into(t, torch.empty(8)))(torch.ones(4, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("in_dim, dim", [(0, -1), (1, -1), (2, -1), (2, 0), (0, 1), (-1, 0)])
def test_vmap_matches_the_transform_of_each_slice(in_dim, dim, dtype, generator):
    x = torch.randn(4, 8, 12, dtype=dtype, generator=generator)  # (2, -1): the batch is the last dimension
    got = torch.func.vmap(lambda t: dr.fwht(t, dim=dim), in_dims=in_dim)(x)
    slices = [dense_fwht(t, dim=dim) for t in x.unbind(in_dim)]
    torch.testing.assert_close(got.double(), torch.stack(slices), rtol=1e-5, atol=1e-5)


def test_torch_func_jacobians_are_the_hadamard_matrix(generator):
    x = torch.randn(24, dtype=torch.float64, generator=generator)
    h = dr.hadamard_matrix(24).double() / math.sqrt(24)
    torch.testing.assert_close(torch.func.jacrev(dr.fwht)(x), h)
    torch.testing.assert_close(torch.func.jacfwd(dr.fwht)(x), h)
    w = torch.randn(24, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(torch.func.grad(lambda t: (dr.fwht(t) * w).sum())(x), h.T @ w)
    primal, tangent = torch.func.jvp(dr.fwht, (x,), (w,))
    torch.testing.assert_close(primal, h @ x)
    torch.testing.assert_close(tangent, h @ w)


def test_per_sample_gradients_by_vmap_of_grad(generator):
    x = torch.randn(6, 16, dtype=torch.float64, generator=generator)
    w = torch.randn(16, dtype=torch.float64, generator=generator)
    per_sample = torch.func.vmap(torch.func.grad(lambda t: (torch.tanh(dr.fwht(t)) * w).sum()))(x)
    expected = []
    for row in x:
        row = row.clone().requires_grad_()
        (torch.tanh(dense_fwht(row)) * w).sum().backward()
        expected.append(row.grad)
    torch.testing.assert_close(per_sample, torch.stack(expected))


def test_a_tensor_that_escaped_a_torch_func_transform_is_transformed_with_its_gradient(generator):
    # A wrapper kept past its transform is "dead": it goes through the eager path like a plain tensor of its
    # values (that path's apply, which skips torch's argument binding, unwraps it as torch's does).
    escaped = []

    def loss(t):
        escaped.append(t)
        return (t * t).sum()

    torch.func.grad(loss)(torch.randn(16, dtype=torch.float64, generator=generator))
    wrapper = escaped[0]
    expected = dense_fwht(wrapper.detach().clone())
    torch.testing.assert_close(dr.fwht(wrapper), expected)
    leaf = torch.randn(16, dtype=torch.float64, generator=generator, requires_grad=True)
    y = dr.fwht(wrapper + leaf)
    torch.testing.assert_close(y, expected + dense_fwht(leaf.detach()))
    w = torch.randn(16, dtype=torch.float64, generator=generator)
    (y * w).sum().backward()
    torch.testing.assert_close(leaf.grad, dense_fwht(w))


def test_in_place_under_vmap_writes_each_slice(generator):
    x = torch.randn(3, 8, generator=generator)
    expected = dense_fwht(x).float()
    torch.func.vmap(lambda t: dr.fwht(t, inplace=True))(x)
    torch.testing.assert_close(x, expected)


def test_forward_mode_ad_carries_the_tangent_through_the_transform(generator):
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(3, 384, dtype=torch.float64, generator=generator)
    tangent = torch.randn(3, 384, dtype=torch.float64, generator=generator)
    with fwAD.dual_level():
        primal, jvp = fwAD.unpack_dual(dr.fwht(fwAD.make_dual(x, tangent)))
    torch.testing.assert_close(primal, dense_fwht(x))
    torch.testing.assert_close(jvp, dense_fwht(tangent))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # sizes are baked in as constants: expected
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace is deprecated, still used
def test_jit_trace_records_the_transform(generator):
    traced = torch.jit.trace(lambda x: dr.fwht(x) * 2.0, torch.randn(2, 64, generator=generator))
    other = torch.randn(2, 64, generator=generator)
    torch.testing.assert_close(traced(other), dr.fwht(other) * 2.0)


def test_in_place_on_a_tensor_saved_for_backward_is_refused():
    weight = torch.randn(3, 8, requires_grad=True)
    x = torch.randn(3, 8)
    loss = (weight * x).sum()  # saves x for the gradient of weight
    dr.fwht(x, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_length_errors_name_the_function_and_a_remedy_that_applies():
    with pytest.raises(ValueError, match=r"^fwht_reference: dimension -1 has length 5,.*pad_to_hadamard"):
        dr.fwht_reference(torch.zeros(2, 5))
    too_long = torch.zeros(1).expand(28 * 2**30 + 1)  # no supported length above it: padding cannot help
    with pytest.raises(ValueError, match=r"^fwht: .*Nearest supported lengths: 30064771072\. It is longer than"):
        dr.fwht(too_long)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_last_dim_result_that_requires_grad_is_not_a_view(dtype):
    """It was ``movedim(-1, -1)`` of the result: a view with an extra autograd node, so ``detach_()`` raised
    "Can't detach views in-place" (a user audit). The gradient is the transform's, as before."""
    x = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    y = dr.fwht(x)
    assert not y._is_view()
    grad = torch.randn(4, 8, dtype=dtype)
    (x_grad,) = torch.autograd.grad(y, x, grad)
    torch.testing.assert_close(x_grad, dr.fwht_reference(grad))
    y.detach_()
    assert not y.requires_grad
