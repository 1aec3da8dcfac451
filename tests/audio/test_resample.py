"""Band-limited resampling against analytic sinusoids and scipy.signal.resample_poly."""

import math

import numpy as np
import pytest
import torch

from dreidel.audio import resample

RATE_PAIRS = [(8000, 16000), (44100, 16000), (22050, 16000), (48000, 16000), (16000, 8000), (11025, 16000)]


def _tones(rate_in, rate_out, n_in, generator):
    """Three random in-band tones (below 0.4 of the lower rate) and the times where the output samples fall."""
    band = 0.4 * min(rate_in, rate_out)
    freqs = torch.rand(3, generator=generator, dtype=torch.float64) * (band - 50) + 50
    phases = torch.rand(3, generator=generator, dtype=torch.float64) * 2 * math.pi

    def signal(times):
        return torch.sin(2 * math.pi * freqs[:, None] * times[None, :] + phases[:, None]).sum(0)

    return signal


# Rates whose reduced ratio to 16 kHz is large (NTSC 44056 Hz, the classic Macintosh 22254 / 11127 Hz): the
# polyphase table would be new x (orig + taps) entries, hundreds of MB to GB; resample takes another method.
ODD_RATE_PAIRS = [(44056, 16000), (22254, 16000), (11127, 16000), (16000, 22254)]


@pytest.mark.parametrize("rate_in, rate_out", RATE_PAIRS + ODD_RATE_PAIRS)
def test_band_limited_signal_is_exact(rate_in, rate_out, generator):
    n_in = rate_in // 2
    signal = _tones(rate_in, rate_out, n_in, generator)
    out = resample(signal(torch.arange(n_in, dtype=torch.float64) / rate_in), rate_in, rate_out)
    assert out.shape == (math.ceil(n_in * rate_out / rate_in),)
    expected = signal(torch.arange(out.shape[0], dtype=torch.float64) / rate_out)
    interior = slice(rate_out // 20, -rate_out // 20)  # the filter sees zeros beyond the ends
    assert torch.allclose(out[interior], expected[interior], atol=2e-4, rtol=0)


@pytest.mark.parametrize("rate_in, rate_out", RATE_PAIRS)
def test_matches_scipy_resample_poly(rate_in, rate_out, generator):
    scipy_signal = pytest.importorskip("scipy.signal")
    n_in = rate_in // 2
    signal = _tones(rate_in, rate_out, n_in, generator)
    x = signal(torch.arange(n_in, dtype=torch.float64) / rate_in)
    divisor = math.gcd(rate_in, rate_out)
    reference = scipy_signal.resample_poly(x.numpy(), rate_out // divisor, rate_in // divisor)
    out = resample(x.float(), rate_in, rate_out)
    assert out.dtype == torch.float32 and out.shape == reference.shape
    interior = slice(rate_out // 20, -rate_out // 20)
    # scipy's default filter is shorter (its own error on these tones is ~5e-3), so the bound is scipy's accuracy
    assert np.abs(out.numpy() - reference)[interior].max() < 1e-2


@pytest.mark.parametrize("rate_in", [44100, 22050, 48000])
def test_removes_frequencies_above_the_new_nyquist(rate_in):
    n_in = rate_in
    tone = torch.sin(2 * math.pi * 9000.0 * torch.arange(n_in, dtype=torch.float64) / rate_in)  # aliases to 7 kHz
    out = resample(tone, rate_in, 16000)
    assert out[800:-800].abs().max() < 1e-3


def test_batch_shape_and_identity(generator):
    x = torch.randn(2, 3, 441, generator=generator)
    out = resample(x, 44100, 16000)
    assert out.shape == (2, 3, 160)
    assert torch.allclose(out[1, 2], resample(x[1, 2], 44100, 16000), atol=1e-6)
    assert torch.equal(resample(x, 16000, 16000), x)
    assert resample(torch.zeros(0), 8000, 16000).shape == (0,)


def test_integer_samples_and_a_samples_channels_layout_are_refused():
    """int16 PCM was cast unscaled (peaks of 20000 passed on as audio); a (samples, 2) stereo array was
    resampled across its two channels, into (samples, 1)."""
    with pytest.raises(TypeError, match=r"floating-point samples, got torch.int16 \(integer PCM: .*pcm_to_float"):
        resample(torch.ones(10, dtype=torch.int16), 8000, 16000)
    stereo = torch.zeros(16000, 2)
    with pytest.raises(ValueError, match=r"resample: audio must be \(\.\.\., samples\), got shape \(16000, 2\).*audio.T"):
        resample(stereo, 16000, 8000)
    assert resample(stereo.T, 16000, 8000).shape == (2, 8000)
    assert resample(torch.zeros(63, 1), 16000, 8000).shape == (63, 1)  # short rows, not many times longer


@pytest.mark.parametrize("rate", [0, -8000, 8000.5, None])
def test_bad_rates(rate):
    with pytest.raises(ValueError, match="orig_rate"):
        resample(torch.zeros(10), rate, 16000)

@pytest.mark.parametrize("option, value, error, message", [
    ("zero_crossings", 0, ValueError, "zero_crossings: expected an int >= 1, got 0"),  # used to give NaN
    ("zero_crossings", 2.5, TypeError, "zero_crossings: expected an int"),
    ("rolloff", 0.0, ValueError, r"rolloff: expected a number in \(0, 1\], got 0.0"),  # used to give zeros
    ("rolloff", -0.5, ValueError, r"rolloff: expected a number in \(0, 1\], got -0.5"),
    ("rolloff", 1.5, ValueError, r"rolloff: expected a number in \(0, 1\], got 1.5"),  # used to alias
    ("rolloff", float("nan"), ValueError, "rolloff: expected a finite number"),
    ("kaiser_beta", -1.0, ValueError, r"kaiser_beta: expected a number in \[0, inf\)"),
    ("kaiser_beta", float("nan"), ValueError, "kaiser_beta: expected a finite number"),
])
def test_bad_filter_options_are_refused_naming_them(option, value, error, message):
    with pytest.raises(error, match=message):
        resample(torch.zeros(1000), 44100, 16000, **{option: value})


def test_scalar_audio_is_refused():
    with pytest.raises(ValueError, match="audio must have a samples axis"):
        resample(torch.tensor(1.0), 44100, 16000)


def test_rates_too_far_apart_are_refused_not_allocated():
    with pytest.raises(ValueError, match="resampling 1000003 Hz to 16000 Hz needs 16000 filter phases"):
        resample(torch.zeros(100), 1_000_003, 16000)


@pytest.mark.parametrize("rate_in", [44056, 22254])
def test_odd_rates_need_little_memory(rate_in):
    import tracemalloc

    from dreidel.audio import _resample

    x = torch.randn(rate_in // 4, dtype=torch.float64)
    _resample._cached_direct_kernel_table.cache_clear()  # the table is built inside the measurement
    tracemalloc.start()  # sees the numpy kernel tables
    try:
        resample(x, rate_in, 16000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, f"{peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("rate_in, rate_out", RATE_PAIRS + [(1, 3), (16000, 44100)])
def test_direct_path_equals_polyphase(rate_in, rate_out, generator, monkeypatch):
    """The per-output kernel path of large ratios computes the same filter as the polyphase path."""
    from dreidel.audio import _resample

    x = torch.randn(2, 3, rate_in // 8 + 5, generator=generator, dtype=torch.float64)
    polyphase = resample(x, rate_in, rate_out)
    monkeypatch.setattr(_resample, "_MAX_POLYPHASE_TABLE", 0)
    monkeypatch.setattr(_resample, "_DIRECT_STEP_VALUES", 6 * 1000 * 50)  # several steps of at most 1000 outputs
    direct = resample(x, rate_in, rate_out)
    assert direct.shape == polyphase.shape
    torch.testing.assert_close(direct, polyphase, rtol=0, atol=1e-12)
    assert resample(x.float(), rate_in, rate_out).dtype == torch.float32


def test_large_direct_tables_are_not_kept_after_the_call(monkeypatch):
    """An odd rate such as 600001 Hz builds a 244 MB table; the cache kept sixteen such tables (about 4 GB) for
    the life of the process (a user audit). Tables above _MAX_CACHED_DIRECT_TABLE entries are built per call."""
    from dreidel.audio import _resample

    x = torch.randn(5000, dtype=torch.float64)
    _resample._cached_direct_kernel_table.cache_clear()
    kept = resample(x, 44056, 16000)  # 2000 phases of 142 taps: small, kept
    assert _resample._cached_direct_kernel_table.cache_info().currsize == 1
    monkeypatch.setattr(_resample, "_MAX_CACHED_DIRECT_TABLE", 1000)  # now that table counts as large
    _resample._cached_direct_kernel_table.cache_clear()
    torch.testing.assert_close(resample(x, 44056, 16000), kept, rtol=0, atol=0)
    assert _resample._cached_direct_kernel_table.cache_info().currsize == 0


@pytest.mark.parametrize("rate", [192001, 44100])  # the direct path and the polyphase one
def test_a_batch_of_no_channels_gives_no_channels(rate):
    """A (0, n) batch divided by zero in the direct path (the step size per batch row) and failed to reshape in
    the polyphase one (a review)."""
    out = resample(torch.zeros(0, rate), rate, 16000)
    assert out.shape == (0, 16000)
    assert resample(torch.zeros(2, 0, rate, dtype=torch.float64), rate, 16000).shape == (2, 0, 16000)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool])
def test_complex_and_bool_audio_are_refused(dtype):
    """A complex tensor lost its imaginary part with only torch's generic warning."""
    with pytest.raises(TypeError, match=f"audio must hold floating-point samples, got {dtype}$"):
        resample(torch.ones(100, dtype=dtype), 44100, 16000)
