"""parallel_commit kernels (CPU, and CUDA when available) against r2lm_kernels.reference.parallel_commit."""
import math

import pytest
import torch

import r2lm_kernels
from r2lm_kernels import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SCORES = ["prob", "margin", "neg_entropy"]


def _logits(batch, block, vocab, dtype, device, layout="contiguous"):
    """Random logits, never zeros, with a per-position spread so the scores differ across positions.
    layout: "contiguous"; "vocab_slice" (rows cut out of a wider tensor at an odd offset, so rows start
    unaligned); "transposed" (batch and block strides swapped)."""
    scale = torch.empty(batch, block, 1, device=device).uniform_(0.5, 4.0)
    if layout == "vocab_slice":
        wide = torch.randn(batch, block, vocab + 9, device=device) * scale
        return wide.to(dtype)[..., 3:3 + vocab]
    if layout == "transposed":
        base = torch.randn(block, batch, vocab, device=device) * scale.transpose(0, 1)
        return base.to(dtype).transpose(0, 1)
    return (torch.randn(batch, block, vocab, device=device) * scale).to(dtype)


def _tokens(batch, block, vocab, mask_id, device, masked_fraction=0.7):
    tokens = torch.randint(0, vocab - 1, (batch, block), device=device)
    tokens[tokens >= mask_id] += 1                               # unmasked positions hold other tokens
    tokens[torch.rand(batch, block, device=device) < masked_fraction] = mask_id
    return tokens


@pytest.fixture
def run_commit(poison_memory):
    """run_commit(logits, tokens, **kwargs) -> (kernel, reference) results, each (committed, confidence,
    n_masked, tokens after), the kernel's outputs (bool, fp32 and int32) poisoned first."""
    def run(logits, tokens, **kwargs):
        got_tokens, want_tokens = tokens.clone(), tokens.clone()
        batch, block = tokens.shape
        poison_memory(logits.device, batch * block, 4 * batch * block, 4 * batch)
        got = r2lm_kernels.parallel_commit(logits, got_tokens, **kwargs)
        want = ref.parallel_commit(logits, want_tokens, **kwargs)
        return (*got, got_tokens), (*want, want_tokens)
    return run


def _assert_confidence_close(got, want, got_tokens, logits, tokens, kwargs, rel_err):
    """fp64: against the reference to 1e-12. Lower precisions, FlashAttention-style: the kernel's error
    against the fp64 reference at most 3x (+ 1e-6) the error of the reference computed in fp32 (which
    grows with the vocab: torch's fp32 softmax over 262,144 tokens is off by ~1e-5)."""
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)), "the kernel and the reference disagree on eligibility"
    assert torch.equal(got[~finite], want[~finite])              # -inf (or +inf margins) exactly
    if logits.dtype == torch.float64:
        if finite.any():
            assert rel_err(got[finite], want[finite]) <= 1e-12
        return
    exact_tokens = tokens.clone()
    exact = ref.parallel_commit(logits.double(), exact_tokens, **kwargs)[1]
    same = finite & (exact_tokens == got_tokens)                 # sampled candidates may differ on near-ties
    if same.any():
        # Errors relative to the scores' norm, or absolute for scores below 1 (an entropy near 0 is
        # xsum / sum - log(sum), two terms that cancel: its error is small absolutely, not relatively).
        exact = exact[same].double()
        scale = max(float(exact.norm()), math.sqrt(exact.numel()))
        err = float((got[same].double() - exact).norm()) / scale
        err_ref = float((want[same].double() - exact).norm()) / scale
        assert err <= 3 * err_ref + 1e-6, f"confidence error {err:.3g} vs the fp32 reference's {err_ref:.3g}"


def _assert_same_outcome(got, want, atol=1e-7):
    """Same committed positions, tokens and n_masked; confidences equal up to fp32 rounding (absolutely
    ~1e-6 for neg_entropy near 0: pass atol=1e-5)."""
    for name, g, w in zip(["committed", "confidence", "n_masked", "tokens"], got, want):
        if name == "confidence":
            assert torch.equal(torch.isfinite(g), torch.isfinite(w)) and torch.equal(g[~torch.isfinite(g)],
                                                                                     w[~torch.isfinite(w)])
            assert torch.allclose(g, w, rtol=1e-5, atol=atol), name
        else:
            assert torch.equal(g, w), name


def _gumbel_pick(logits, b, i, v, temperature, seed, step):
    """x / T - log(-log(u)) of token v at (b, i) in fp64, to judge near-ties."""
    u = float(ref.gumbel_uniform(seed, step, b, i, v))
    return float(logits[b, i, v]) / temperature - math.log(-math.log(u))


def _assert_candidates_equal(got_tokens, want_tokens, logits, temperature, seed, step):
    """Greedy candidates must agree exactly. Sampled ones too, except where the two best Gumbel picks
    are so close that one ulp of log() or of x / T decides (CUDA's reference divides by a reciprocal)."""
    diff = (got_tokens != want_tokens).nonzero().tolist()
    if temperature == 0:
        assert not diff, f"candidates differ at {diff[:5]}"
        return
    assert len(diff) <= 1 + got_tokens.numel() // 500, f"sampled candidates differ at {len(diff)} positions"
    for b, i in diff:
        a = _gumbel_pick(logits, b, i, int(got_tokens[b, i]), temperature, seed, step)
        c = _gumbel_pick(logits, b, i, int(want_tokens[b, i]), temperature, seed, step)
        assert abs(a - c) <= 1e-5 * max(1.0, abs(a)), f"sampled candidate at {(b, i)} is not a near-tie: {a} vs {c}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("shape,layout", [((2, 17, 1000), "contiguous"), ((1, 1, 2), "contiguous"),
                                          ((3, 33, 4099), "vocab_slice"), ((2, 5, 777), "transposed")])
def test_candidates_and_scores_match_reference(device, dtype, score, temperature, shape, layout, rel_err, vector_width,
                                               run_commit):
    """threshold=-inf commits every eligible position, exposing each candidate and score."""
    batch, block, vocab = shape
    mask_id = int(torch.randint(0, vocab, ()))
    logits = _logits(batch, block, vocab, dtype, device, layout)
    tokens = _tokens(batch, block, vocab, mask_id, device)
    seed, step = int(torch.randint(-2**62, 2**62, ())), int(torch.randint(0, 2**40, ()))
    kwargs = dict(mask_token_id=mask_id, threshold=-math.inf, temperature=temperature, seed=seed, step=step,
                  score=score)
    (committed, confidence, n_masked, got_tokens), want = run_commit(logits, tokens, **kwargs)
    assert torch.equal(committed, want[0])
    assert torch.equal(committed, tokens == mask_id)
    _assert_candidates_equal(got_tokens, want[3], logits, temperature, seed, step)
    assert torch.equal(n_masked, (got_tokens == mask_id).sum(1).int())
    _assert_confidence_close(confidence, want[1], got_tokens, logits, tokens, kwargs, rel_err)
    assert confidence.dtype == torch.float32 and n_masked.dtype == torch.int32 and committed.dtype == torch.bool


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("vocab", [151936, 262144])
def test_large_vocab(device, dtype, temperature, vocab, rel_err, vector_width, run_commit):
    batch, block = 2, 3                                          # few rows: the CUDA kernel splits each row
    logits = _logits(batch, block, vocab, dtype, device)
    mask_id = vocab - 1
    tokens = torch.full((batch, block), mask_id, device=device)
    seed, step = int(torch.randint(0, 2**31, ())), 3
    kwargs = dict(mask_token_id=mask_id, threshold=-math.inf, temperature=temperature, seed=seed, step=step)
    (committed, confidence, n_masked, got_tokens), want = run_commit(logits, tokens, **kwargs)
    assert committed.all()
    _assert_candidates_equal(got_tokens, want[3], logits, temperature, seed, step)
    _assert_confidence_close(confidence, want[1], got_tokens, logits, tokens, kwargs, rel_err)


@pytest.mark.parametrize("temperature,scale,center", [(0.1, 2.0, 0.0), (2.0, 1.0, -100.0)])
def test_sampling_at_temperatures_far_from_one(device, temperature, scale, center, vector_width, run_commit):
    """The kernels skip a vector of logits whose largest, divided by the temperature, plus a bound on the noise
    cannot beat the pick so far: logits spread far past that bound (T 0.1) or far below zero (T 2) show a
    bound applied to the undivided logits."""
    batch, block, vocab = 2, 16, 8000
    logits = torch.randn(batch, block, vocab, device=device) * scale + center
    tokens = torch.full((batch, block), vocab - 1, device=device)
    seed, step = int(torch.randint(0, 2**31, ())), 5
    got, want = run_commit(logits, tokens, mask_token_id=vocab - 1, threshold=-math.inf, temperature=temperature,
                           seed=seed, step=step)
    _assert_candidates_equal(got[3], want[3], logits, temperature, seed, step)


# The largest rounding differences between kernel and reference scores seen in fp32 (CPU and emulated CUDA
# kernels, vocab 101 and 301) are ~5e-7 relative for prob, ~5e-7 absolute for margin and ~2e-6 absolute for
# neg_entropy (xsum / sum - log(sum) cancels near 0); scores 10x that apart rank the same in both.
SEPARATION = {"prob": 0.0, "margin": 5e-6, "neg_entropy": 2e-5}


def _separated_draw(batch, block, vocab, mask_id, device, score, temperature):
    """Random logits with a per-position spread (so that prob, margin and neg_entropy rank positions
    differently), tokens, active sequences, seed and step. A masked position whose score is within 10x
    rounding (SEPARATION, plus 5e-6 relative) of a lower one of its sequence, or whose sampled candidate is a
    near-tie that kernel and reference decide differently, is unmasked: kernel and reference must then select
    exactly the same positions. Returns the op's arguments and the reference's scores (-inf where not
    eligible)."""
    logits = _logits(batch, block, vocab, torch.float32, device)
    tokens = _tokens(batch, block, vocab, mask_id, device)
    active = torch.rand(batch, device=device) < 0.8
    seed, step = int(torch.randint(-2**62, 2**62, ())), int(torch.randint(0, 2**40, ()))
    kwargs = dict(mask_token_id=mask_id, active=active, score=score, temperature=temperature, seed=seed, step=step)
    want_tokens = tokens.clone()
    scores = ref.parallel_commit(logits, want_tokens, threshold=-math.inf, **kwargs)[1]
    s, order = scores.double().sort(-1)
    too_close = torch.zeros_like(tokens, dtype=torch.bool).scatter_(
        1, order[:, 1:], ~(s[:, 1:] - s[:, :-1] >= 5e-6 * s[:, 1:].abs() + SEPARATION[score]))
    if temperature > 0:
        got_tokens = tokens.clone()
        r2lm_kernels.parallel_commit(logits, got_tokens, threshold=-math.inf, **kwargs)
        _assert_candidates_equal(got_tokens, want_tokens, logits, temperature, seed, step)  # near-ties only
        too_close |= got_tokens != want_tokens
    too_close &= torch.isfinite(scores)
    tokens[too_close] = (mask_id + 1) % vocab
    return logits, tokens, kwargs, scores.masked_fill(too_close, -math.inf)


def _threshold_in_a_gap(scores):
    """A threshold near the median score, in the widest gap between neighbouring scores there (-inf scores,
    of positions that are not eligible, left out)."""
    s = scores[torch.isfinite(scores)].double().sort().values
    if len(s) == 0:
        return 0.0
    lo, hi = len(s) // 4, max(len(s) // 4 + 1, 3 * len(s) // 4)
    gaps = s[lo + 1:hi + 1] - s[lo:hi]
    k = lo + int(gaps.argmax()) if len(gaps) else 0
    return float((s[k] + s[min(k + 1, len(s) - 1)]) / 2)


RULES = {  # (threshold, min_per_step, max_per_step)
    "threshold": lambda q: (q, 1, 0),
    "topk": lambda q: (math.inf, 3, 3),
    "quota": lambda q: (q, 4, 0),
    "threshold_capped": lambda q: (q, 1, 2),
    "min_above_max": lambda q: (q, 4, 2),          # the cap wins: at most 2
    "nothing_passes": lambda q: (1.5, 1, 0),       # above every score (prob, margin <= 1, neg_entropy <= 0)
    "nothing_passes_min0": lambda q: (1.5, 0, 0),
    "all_pass": lambda q: (-10.0, 1, 0),           # below every score (neg_entropy >= -log(vocab))
}


# Sampling changes only prob's score (that of the sampled candidate); margin and neg_entropy do not depend on
# the candidate, and every score at temperature > 0 is checked by test_candidates_and_scores_match_reference.
@pytest.mark.parametrize("score,temperature", [(score, 0.0) for score in SCORES] + [("prob", 0.8)])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("block", [1, 17, 32, 128, 1024])
def test_selection_matches_reference(device, rule, block, score, temperature, run_commit):
    """Threshold, min-fill and max-cap all go by the chosen score."""
    batch, vocab = 5, 101
    mask_id = 7
    logits, tokens, kwargs, scores = _separated_draw(batch, block, vocab, mask_id, device, score, temperature)
    threshold, min_k, max_k = RULES[rule](_threshold_in_a_gap(scores))
    got, want = run_commit(logits, tokens, threshold=threshold, min_per_step=min_k, max_per_step=max_k, **kwargs)
    _assert_same_outcome(got, want, atol=1e-5 if score == "neg_entropy" else 1e-7)


@pytest.mark.parametrize("score", SCORES)
def test_confidence_equal_to_the_threshold_commits(device, score, run_commit):
    """The rule is confidence >= threshold, compared exactly: a position at the threshold commits, one below a
    threshold that rounds to its fp32 confidence does not."""
    logits = torch.full((1, 3, 5), -1e4, device=device)
    logits[0, :, 2] = 0.0                      # one token takes all the probability: prob exactly 1
    tokens = torch.full((1, 3), 4, device=device)
    _, confidence, _ = r2lm_kernels.parallel_commit(logits, tokens.clone(), mask_token_id=4, threshold=-math.inf,
                                                    score=score)
    threshold = float(confidence[0, 0])
    assert math.isfinite(threshold) and torch.equal(confidence, torch.full_like(confidence, threshold))
    got, want = run_commit(logits, tokens, mask_token_id=4, threshold=threshold, min_per_step=0, score=score)
    _assert_same_outcome(got, want)
    assert got[0].all()
    # Rounds to the confidence in fp32 (the larger of the kernel's and the reference's: neg_entropy's differ)
    above = math.nextafter(max(threshold, float(want[1].max())), math.inf)
    got, want = run_commit(logits, tokens, mask_token_id=4, threshold=above, min_per_step=0, score=score)
    _assert_same_outcome(got, want)
    assert not got[0].any()


def test_strided_tokens_are_updated_in_place(device):
    """tokens may be any strided view (here every other column of a wider buffer); no copy is made."""
    batch, block, vocab, mask_id = 3, 17, 500, 2
    logits = _logits(batch, block, vocab, torch.float16, device, "transposed")
    wide = torch.full((batch, 2 * block), -5, device=device)
    tokens = wide[:, ::2]
    tokens.copy_(_tokens(batch, block, vocab, mask_id, device))
    want_tokens = tokens.clone()
    want = ref.parallel_commit(logits, want_tokens, mask_token_id=mask_id, threshold=-math.inf)
    got = r2lm_kernels.parallel_commit(logits, tokens, mask_token_id=mask_id, threshold=-math.inf)
    assert torch.equal(wide[:, ::2], want_tokens) and (wide[:, 1::2] == -5).all()
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ties_go_to_the_lower_position_and_token(device, dtype, vector_width, run_commit):
    batch, block, vocab, mask_id = 2, 8, 64, 0
    logits = torch.randn(batch, block, vocab, device=device)
    logits[:, 5] = logits[:, 2]                                  # equal rows: equal confidence
    top = logits.amax(-1) + 1.0
    logits[0, :, 10] = logits[0, :, 20] = top[0]                 # tokens 10 and 20 tie for the argmax (apart)
    logits[1, :, 5] = logits[1, :, 6] = top[1]                   # tokens 5 and 6 (side by side in a vector)
    tokens = torch.full((batch, block), mask_id, device=device)
    kwargs = dict(mask_token_id=mask_id, threshold=math.inf, min_per_step=1, max_per_step=1)
    logits[:, 2] = logits[:, 2] * 3                              # positions 2 and 5 the most confident
    logits[:, 5] = logits[:, 2]
    got, want = run_commit(logits.to(dtype), tokens, **kwargs)
    assert got[0].nonzero().tolist() == [[0, 2], [1, 2]]
    assert got[3][:, 2].tolist() == [10, 5]
    assert got[1][:, 2].equal(got[1][:, 5])
    _assert_same_outcome(got, want)


def test_non_finite_rows_are_never_committed(device, vector_width, run_commit):
    vocab, mask_id = 50, 3
    logits = torch.randn(1, 8, vocab, device=device)
    logits[0, :, mask_id] = 1e4                                  # the mask token dominates: never a candidate
    logits[0, 1, 11] = math.nan
    logits[0, 2, 12] = math.inf
    logits[0, 3, :] = -math.inf                                  # only the mask token is possible
    logits[0, 3, mask_id] = 0.0
    logits[0, 4, :] = -math.inf                                  # nothing at all is possible
    logits[0, 5, ::2] = -math.inf                                # some -inf logits: a normal row
    logits[0, 6, mask_id] = math.nan
    logits[0, 7, mask_id] = -math.inf
    tokens = torch.full((1, 8), mask_id, device=device)
    for score in SCORES:
        for temperature in (0.0, 1.3):
            kwargs = dict(mask_token_id=mask_id, threshold=0.0, min_per_step=8, temperature=temperature,
                          score=score, seed=1, step=2)
            (committed, confidence, n_masked, got_tokens), want = run_commit(logits, tokens, **kwargs)
            assert committed.tolist() == [[True, False, False, False, False, True, False, True]], (score, temperature)
            assert (got_tokens[committed] != mask_id).all()
            assert (confidence[~committed] == -math.inf).all()
            assert int(n_masked) == 5
            assert torch.equal(committed, want[0]) and torch.equal(got_tokens, want[3])
            # Rows 0 and 5 are dominated by the mask token's logit: their scores stay finite all the same.
            torch.testing.assert_close(confidence[committed], want[1][committed], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("vocab", [8, 5000])
def test_logits_further_apart_than_the_float_range(device, dtype, vocab, vector_width, run_commit):
    """Rows of the dtype's lowest value (a usual masking value; the mask token's too) with one huge logit:
    x - max overflows to -inf, and the entropy's e^(x - max) (x - max) must count 0 there, not NaN, in every
    merge of partial sums (CPU chunks of the vocab, CUDA threads and splits). A NaN score would also break the
    ranking of the sequence's other positions."""
    mask_id, lowest = 3, torch.finfo(dtype).min
    huge = 1e300 if dtype == torch.float64 else 1e32
    logits = _logits(1, 6, vocab, torch.float64, device)
    for row, index in [(1, 0), (3, vocab - 1), (4, vocab // 2)]:  # the huge logit before and after the others
        logits[0, row] = lowest
        logits[0, row, index] = huge
    logits = logits.to(dtype)
    tokens = torch.full((1, 6), mask_id, device=device)
    for score in SCORES:
        for quota in (1, 2, 4):
            kwargs = dict(mask_token_id=mask_id, threshold=math.inf, min_per_step=quota, max_per_step=quota,
                          score=score)
            got, want = run_commit(logits, tokens, **kwargs)
            assert torch.isfinite(got[1]).all(), (score, got[1])
            # A one-hot softmax, exactly: the three rows tie, and ties go to the lower position.
            assert got[1][0, [1, 3, 4]].tolist() == ([0.0] * 3 if score == "neg_entropy" else [1.0] * 3)
            assert int(got[0].sum()) == quota
            _assert_same_outcome(got, want, atol=1e-5)


def test_margin_with_a_single_candidate_token_is_infinite(device, run_commit):
    logits = torch.randn(2, 3, 2, device=device)
    tokens = torch.ones(2, 3, dtype=torch.long, device=device)
    got, want = run_commit(logits, tokens, mask_token_id=1, threshold=0.5, score="margin")
    assert (got[1] == math.inf).all() and torch.equal(got[1], want[1]) and (got[3] == 0).all()


@pytest.mark.parametrize("strided", [False, True])
def test_inactive_sequences_are_untouched(device, strided, run_commit):
    batch, block, vocab, mask_id = 4, 16, 100, 99
    logits = _logits(batch, block, vocab, torch.float32, device)
    tokens = torch.full((batch, block), mask_id, device=device)
    active = torch.tensor([True, True, False, False, True, True, False, False], device=device)[::2] if strided \
        else torch.tensor([True, False, True, False], device=device)
    got, want = run_commit(logits, tokens, mask_token_id=mask_id, threshold=0.0, min_per_step=2, active=active)
    committed, confidence, n_masked, got_tokens = got
    assert not committed[~active].any() and (confidence[~active] == -math.inf).all()
    assert (got_tokens[~active] == mask_id).all()
    assert n_masked.tolist() == [0, block, 0, block]
    _assert_same_outcome(got, want)


def _chi_square_critical(dof, z=3.719):
    """Wilson-Hilferty approximation of the chi-square quantile; z = 3.719 is the normal 1 - 1e-4 quantile,
    so a correct sampler fails this test about once in 10,000 runs."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_follows_softmax(device, temperature, dtype, vector_width):
    vocab, mask_id, batch, block, steps = 24, 5, 64, 128, 6
    # Logits scaled with the temperature keep every probability above ~3e-3 (expected counts >= 100).
    row = ((torch.randn(vocab, device=device) * 0.6).clamp(-1.2, 1.2) * temperature).to(dtype)
    logits = row.expand(batch, block, vocab)                     # stride-0 view: one distribution everywhere
    counts = torch.zeros(vocab, dtype=torch.float64, device=device)
    seed = int(torch.randint(0, 2**62, ()))
    for step in range(steps):
        tokens = torch.full((batch, block), mask_id, device=device)
        r2lm_kernels.parallel_commit(logits, tokens, mask_token_id=mask_id, threshold=-math.inf,
                                     temperature=temperature, seed=seed, step=step)
        counts += torch.bincount(tokens.flatten(), minlength=vocab).double()
    p = torch.softmax(row.double().masked_fill(torch.arange(vocab, device=device) == mask_id, -math.inf)
                      / temperature, 0)
    assert counts[mask_id] == 0
    keep = torch.arange(vocab, device=device) != mask_id
    expected = p[keep] * counts.sum()
    assert float(expected.min()) > 20                            # the chi-square approximation holds
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    assert chi2 < _chi_square_critical(vocab - 2), f"chi2 {chi2:.1f} over {vocab - 2} degrees of freedom"


def test_sampling_is_reproducible(device):
    batch, block, vocab, mask_id = 3, 32, 500, 0
    logits = _logits(batch, block, vocab, torch.float32, device)
    mask = torch.full((batch, block), mask_id, device=device)

    def draw(**kwargs):
        tokens = mask.clone()
        r2lm_kernels.parallel_commit(logits, tokens, mask_token_id=mask_id, threshold=-math.inf, temperature=1.0,
                                     **kwargs)
        return tokens

    first = draw(seed=11, step=4)
    assert torch.equal(first, draw(seed=11, step=4))
    assert torch.equal(first, draw(seed=11, step=torch.tensor([4], device=device)))
    assert not torch.equal(first, draw(seed=11, step=5))
    assert not torch.equal(first, draw(seed=12, step=4))
    assert not torch.equal(first, draw(seed=11 + 2**32, step=4))  # the seed's high word counts


def test_uniform_rounding_to_one_gives_no_infinite_noise(device, vector_width, run_commit):
    """For (seed 0, step 0, batch 930, position 0, token 2885) the uniform (2^24 - 1/2) / 2^24 rounds
    to 1.0 in fp32; uncapped, its Gumbel noise would be +inf and that token (logit -50) would win."""
    batch, vocab, mask_id, unlucky = 931, 4096, 4095, 2885
    assert float(ref.gumbel_uniform(0, 0, 930, 0, unlucky).float()) == 1.0
    row = torch.randn(vocab, device=device)
    row[unlucky] = -50.0
    logits = row.expand(batch, 1, vocab)
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
    tokens[930] = mask_id
    got, want = run_commit(logits, tokens, mask_token_id=mask_id, threshold=-math.inf, temperature=1.0, seed=0, step=0)
    assert bool(got[0][930, 0]) and int(got[3][930, 0]) != unlucky
    assert torch.equal(got[3], want[3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_draw_fresh_samples():
    batch, block, vocab, mask_id = 4, 32, 1000, 1
    logits = _logits(batch, block, vocab, torch.bfloat16, "cuda")
    step = torch.zeros(1, dtype=torch.long, device="cuda")
    tokens = torch.full((batch, block), mask_id, device="cuda")
    kwargs = dict(mask_token_id=mask_id, threshold=-math.inf, temperature=1.0, seed=7)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                                # warm-up outside the capture
        r2lm_kernels.parallel_commit(logits, tokens.clone(), step=step, **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = r2lm_kernels.parallel_commit(logits, tokens, step=step, **kwargs)
    draws = []
    for s in (3, 4, 3):
        step.fill_(s)
        tokens.fill_(mask_id)
        graph.replay()
        eager = torch.full_like(tokens, mask_id)
        eager_out = r2lm_kernels.parallel_commit(logits, eager, step=s, **kwargs)
        assert torch.equal(tokens, eager) and torch.equal(outputs[1], eager_out[1])
        draws.append(tokens.clone())
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])   # confidence is fp32 whatever the logits'
def test_opcheck(device, temperature, dtype):
    logits = _logits(2, 9, 300, dtype, device)
    tokens = _tokens(2, 9, 300, 4, device)
    step = torch.tensor([3], device=device)
    active = torch.tensor([True, False], device=device)
    # No requires_grad variant: the op has no backward (committing is a discrete decision), so autograd
    # is not registered and inputs requiring grad are not a supported use.
    for kwargs in (dict(mask_token_id=4, threshold=0.3, temperature=temperature),
                   dict(mask_token_id=4, threshold=0.3, temperature=temperature, step_tensor=step, active=active,
                        score="margin", min_per_step=2, max_per_step=3)):
        torch.library.opcheck(torch.ops.r2lm.parallel_commit.default, (logits, tokens.clone()), kwargs)


def test_torch_compile_fullgraph(device):
    logits = _logits(2, 16, 300, torch.float32, device)
    tokens = _tokens(2, 16, 300, 4, device)

    def step_fn(lg, tok):
        committed, confidence, n_masked = r2lm_kernels.parallel_commit(lg, tok, mask_token_id=4, threshold=0.2)
        return committed, confidence * 2, n_masked

    compiled = torch.compile(step_fn, fullgraph=True, backend="aot_eager")
    got_tokens, want_tokens = tokens.clone(), tokens.clone()
    got = compiled(logits, got_tokens)
    want = step_fn(logits, want_tokens)
    assert torch.equal(got_tokens, want_tokens)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_bad_inputs_raise_clear_errors(device):
    logits = _logits(2, 4, 10, torch.float32, device)
    tokens = torch.full((2, 4), 9, device=device)
    ok = dict(mask_token_id=9, threshold=0.5)

    def call(lg=logits, tok=tokens, **kwargs):
        r2lm_kernels.parallel_commit(lg, tok.clone(), **{**ok, **kwargs})

    cases = [
        (dict(mask_token_id=10), "mask_token_id"),
        (dict(mask_token_id=-1), "mask_token_id"),
        (dict(lg=logits[0]), "logits must have shape"),
        (dict(lg=logits.to(torch.int32)), "logits must have dtype"),
        (dict(lg=logits.transpose(1, 2)), "logits must have unit stride"),
        (dict(tok=tokens.int()), "tokens must have dtype"),
        (dict(tok=tokens[:, :3]), "tokens must have shape"),
        (dict(active=torch.ones(3, dtype=torch.bool, device=device)), "active must have shape"),
        (dict(active=torch.ones(2, dtype=torch.int32, device=device)), "active must have dtype"),
        (dict(step=torch.zeros(2, dtype=torch.long, device=device)), "step must be an int or a one-element int64"),
        (dict(step=torch.zeros(1, dtype=torch.int32, device=device)), "step must be an int or a one-element int64"),
        (dict(step=2.7), "step must be an int, got 2.7"),
        (dict(seed=2**64), r"seed must be in \[-2\*\*63, 2\*\*64\)"),
        (dict(min_per_step=2**63), r"min_per_step must be in \[-2\*\*63, 2\*\*63\)"),
        (dict(max_per_step=-2**63 - 1), r"max_per_step must be in \[-2\*\*63, 2\*\*63\)"),
        (dict(mask_token_id=2.0), "mask_token_id must be an int, got 2.0"),
        (dict(threshold=None), "threshold must be a number"),
        (dict(temperature=None), "temperature must be a number"),
        (dict(score="entropy"), "score must be"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(temperature=1e-7), "temperature must be 0 .greedy. or a finite number >= 1e-06"),
        (dict(min_per_step=-1), "min_per_step"),
        (dict(max_per_step=-2), "max_per_step"),
        (dict(threshold=math.nan), "threshold"),
        (dict(lg=_logits(1, 1025, 10, torch.float32, device), tok=torch.full((1, 1025), 9, device=device)),
         "block size"),
    ]
    if device == "cuda":
        cases.append((dict(tok=tokens.cpu()), "tokens must be on"))
    for kwargs, message in cases:
        with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
            call(**kwargs)
    with pytest.raises(RuntimeError, match="tokens is written in place"):  # one row for both sequences
        r2lm_kernels.parallel_commit(logits, torch.full((1, 4), 9, device=device).expand(2, 4), **ok)
    with pytest.raises(RuntimeError, match="tokens is written in place"):  # rows sharing half their positions
        r2lm_kernels.parallel_commit(logits, torch.full((6,), 9, device=device).as_strided((2, 4), (2, 1)), **ok)
    with pytest.raises(RuntimeError, match="step_tensor must have dtype"):  # the op itself names its argument
        torch.ops.r2lm.parallel_commit(logits, tokens.clone(), step_tensor=torch.zeros(1, dtype=torch.int32,
                                                                                        device=device), **ok)


def test_seeds_take_all_64_bits(device):
    """A seed is 64 bits: one of 2**63 or more draws what the reference draws, and what the int64 with the
    same bits draws."""
    logits = _logits(2, 16, 300, torch.float32, device)

    def draw(commit, seed):
        tokens = torch.zeros(2, 16, dtype=torch.int64, device=device)
        commit(logits, tokens, mask_token_id=0, threshold=-math.inf, temperature=1.0, seed=seed, step=3)
        return tokens.cpu()

    for seed in (2**64 - 12345, 2**63):
        ours = draw(r2lm_kernels.parallel_commit, seed)
        assert torch.equal(ours, draw(ref.parallel_commit, seed))
        assert torch.equal(ours, draw(r2lm_kernels.parallel_commit, seed - 2**64))
        assert not torch.equal(ours, draw(r2lm_kernels.parallel_commit, seed - 2**63 + 1))


def test_writes_are_visible_to_autograd(device):
    """tokens' version counter moves like a built-in in-place op's: autograd refuses a backward that saved
    the old tokens, and an inference tensor is written only inside inference mode."""
    embedding = torch.nn.Embedding(10, 4).to(device)
    tokens = torch.full((1, 4), 9, device=device)
    tokens[0, 0] = 1
    embedded = embedding(tokens)                       # saves tokens for its backward
    version = tokens._version
    r2lm_kernels.parallel_commit(_logits(1, 4, 10, torch.float32, device), tokens, mask_token_id=9, threshold=-1.0)
    assert tokens._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        embedded.sum().backward()
    with torch.inference_mode():
        frozen = torch.full((1, 4), 9, device=device)
    with pytest.raises(RuntimeError, match="tokens is an inference tensor"):
        r2lm_kernels.parallel_commit(_logits(1, 4, 10, torch.float32, device), frozen, mask_token_id=9, threshold=0.5)
    assert (frozen == 9).all()
    with torch.inference_mode():
        r2lm_kernels.parallel_commit(_logits(1, 4, 10, torch.float32, device), frozen, mask_token_id=9,
                                     threshold=-1.0)
    assert (frozen != 9).all()


def test_fake_implementation_checks_the_rank():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        with pytest.raises(RuntimeError, match=r"logits must have shape \(batch, block, vocab\), got \[5, 11\]"):
            torch.ops.r2lm.parallel_commit(torch.empty(5, 11), torch.empty(5, 1, dtype=torch.int64), mask_token_id=0,
                                           threshold=0.5)


def test_empty_batch_and_block(device):
    for batch, block in ((0, 4), (3, 0)):
        logits = torch.randn(batch, block, 10, device=device)
        tokens = torch.full((batch, block), 9, device=device)
        committed, confidence, n_masked = r2lm_kernels.parallel_commit(logits, tokens, mask_token_id=9, threshold=0.5)
        assert committed.shape == (batch, block) and n_masked.tolist() == [0] * batch


def test_logits_that_require_grad_raise():
    """No backward: the registered op itself refuses, so torch.ops.r2lm callers get no silently missing grad."""
    logits = torch.randn(2, 4, 10, requires_grad=True)
    tokens = torch.full((2, 4), 9)
    with pytest.raises(RuntimeError, match="parallel_commit has no backward: logits requires grad"):
        r2lm_kernels.parallel_commit(logits, tokens, mask_token_id=9, threshold=0.5)
    with pytest.raises(RuntimeError, match="parallel_commit has no backward: logits requires grad"):
        torch.ops.r2lm.parallel_commit(logits, tokens, mask_token_id=9, threshold=0.5, min_per_step=1,
                                       max_per_step=0, temperature=0.0, seed=0, step=0, step_tensor=None,
                                       active=None, score="prob")
    assert (tokens == 9).all()
    with torch.no_grad():
        committed, confidence, _ = r2lm_kernels.parallel_commit(logits, tokens, mask_token_id=9, threshold=-1.0)
    assert committed.all() and not confidence.requires_grad and (tokens != 9).all()


def test_parallel_commit_more_bad_arguments():
    logits = torch.randn(2, 4, 10)
    ok = dict(mask_token_id=9, threshold=0.5)
    for kwargs, message in [(dict(threshold=True), "threshold must be a number"),
                            (dict(temperature=True), "temperature must be a number"),
                            (dict(seed=-2**63 - 1), r"seed must be in \[-2\*\*63, 2\*\*64\)"),
                            (dict(step=-2**63 - 1), r"step must be in \[-2\*\*63, 2\*\*64\)")]:
        with pytest.raises((TypeError, ValueError), match=message):
            r2lm_kernels.parallel_commit(logits, torch.full((2, 4), 9), **{**ok, **kwargs})


def test_reference_commit_caps_ties_to_the_lower_position():
    """max_per_step keeps the most confident, ties to the lower position, also among positions that all pass
    the threshold (the kernels' rule)."""
    logits = torch.randn(1, 8, 50)
    spike = torch.randn(50)
    spike[int(torch.randint(0, 49, ()))] = 12.0                 # a token of probability ~1, not the mask (49)
    logits[0, 5] = logits[0, 2] = spike                          # positions 2 and 5: equal, most confident
    for commit in (ref.parallel_commit, r2lm_kernels.parallel_commit):
        tokens = torch.full((1, 8), 49)
        committed, _, _ = commit(logits, tokens, mask_token_id=49, threshold=-math.inf, max_per_step=1)
        assert committed[0].nonzero().flatten().tolist() == [2], commit.__module__


def test_reference_commit_refuses_what_the_kernels_refuse():
    logits, tokens = torch.randn(1, 4, 10), torch.full((1, 4), 9)
    for temperature in (-1.0, 1e-7, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            ref.parallel_commit(logits, tokens.clone(), mask_token_id=9, threshold=0.5,
                                      temperature=temperature)


def test_reference_commit_skips_rows_whose_picks_all_overflow():
    """Finite logits whose picks x / T overflow to -inf for every token: no candidate, as in the kernels."""
    logits = torch.full((1, 2, 6), -3e38)
    logits[0, 1] = torch.randn(6)
    for commit in (ref.parallel_commit, r2lm_kernels.parallel_commit):
        tokens = torch.full((1, 2), 5)
        committed, confidence, _ = commit(logits, tokens, mask_token_id=5, threshold=-math.inf, temperature=1e-6,
                                          min_per_step=2)
        assert committed.tolist() == [[False, True]] and confidence[0, 0] == -math.inf, commit.__module__
