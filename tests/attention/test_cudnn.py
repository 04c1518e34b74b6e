"""``impl="cudnn"`` on CPU: the fallback decisions, the error without a GPU, the lse fold, CUDA lowering.

cuDNN itself runs only on a CUDA GPU (``tests/kernels/test_gpu.py`` compares it
with the oracle there). Here: which call each option gets (static table and
positions), that asking for it on CPU is a clear error, that importing lca does
not import it, that the lse-cotangent fold is exact (checked through the blockwise
backward), that ring steps see no lse cotangent unless the lse is differentiated,
and, lowering for CUDA from this CPU, that cuDNN's custom calls appear exactly
for the cases it covers.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.attention import attention, blockwise_backward, ring_attention, ulysses_attention, usp_attention
from lca.attention import cudnn
from lca.attention.impl import IMPLS, LocalImpl, get_impl
from lca.attention.logits import LogitOptions
from lca.attention.mask import Mask
from lca.parallel import layout as layouts
from lca.parallel import make_mesh
from tests.oracle import make_inputs, rel_err

BF16 = jnp.bfloat16
LOGIT = LogitOptions(scale=0.125)
CAUSAL = Mask(causal=True)


def _q(d=64, dtype=BF16):
    return jax.ShapeDtypeStruct((1, 16, 2, d), dtype)


# --- the static decision ---------------------------------------------------------------------

# (q, mask, logit, options) -> a phrase of the reason, or None for cuDNN.
TABLE = {
    "bf16 full": (_q(), Mask(), LOGIT, {}, None),
    "fp16 causal": (_q(dtype=jnp.float16), CAUSAL, LOGIT, {}, None),
    "causal window": (_q(), Mask(causal=True, window=5), LOGIT, {}, None),
    "head_dim 128": (_q(128), CAUSAL, LOGIT, {}, None),
    "float32": (_q(dtype=jnp.float32), CAUSAL, LOGIT, {}, "dtype float32"),
    "head_dim 20": (_q(20), CAUSAL, LOGIT, {}, "head_dim 20"),
    "head_dim 256 before sm_90": (_q(256), CAUSAL, LOGIT, {}, "up to 128"),
    "head_dim 256 on sm_90": (_q(256), CAUSAL, LOGIT, {"head_dim_limit": 256}, None),
    "softcap": (_q(), CAUSAL, LogitOptions(0.125, 30.0), {}, "softcap"),
    "segments": (_q(), CAUSAL, LOGIT, {"segments": True}, "segment ids"),
    "window without causal": (_q(), Mask(window=5), LOGIT, {}, "window without causal"),
    "lse cotangent folds": (_q(64), CAUSAL, LOGIT, {"lse_cotangent": True}, None),
    "lse cotangent too wide": (_q(128), CAUSAL, LOGIT, {"lse_cotangent": True}, "lse cotangent"),
    "lse cotangent on sm_90": (_q(128), CAUSAL, LOGIT,
                               {"lse_cotangent": True, "head_dim_limit": 256}, None),
}


@pytest.mark.parametrize("name", list(TABLE))
def test_fallback_reason(name):
    q, mask, logit, options, phrase = TABLE[name]
    options = {"segments": False, "head_dim_limit": 128, **options}
    reason = cudnn.fallback_reason(q, mask, logit, **options)
    if phrase is None:
        assert reason is None, reason
    else:
        assert reason is not None and phrase in reason, reason


def _case(mask, q_pos, kv_pos):
    return int(cudnn.position_case(mask, jnp.asarray(q_pos, jnp.int32), jnp.asarray(kv_pos, jnp.int32)))


# (mask, q positions, kv positions) -> case.
POSITIONS = {
    "full mask, any positions": (Mask(), [5, 1, 9], [3, 0], cudnn.NO_MASK),
    "causal self-attention": (CAUSAL, range(8), range(8), cudnn.CAUSAL),
    "causal, keys all in the past": (CAUSAL, range(16, 24), range(8), cudnn.NO_MASK),
    "causal, more keys, same start": (CAUSAL, range(4), range(8), cudnn.CAUSAL),
    "causal bottom-right (plain q_len < kv_len)": (CAUSAL, range(4, 8), range(8), cudnn.PALLAS),
    "causal, keys in the future": (CAUSAL, range(8), range(8, 16), cudnn.PALLAS),
    "causal, gap in the keys": (CAUSAL, range(8), [0, 1, 2, 3, 5, 6, 7, 8], cudnn.PALLAS),
    # A zigzag shard against itself: chunks 1 and 6 of 8, a gap between them.
    "causal, a zigzag shard's own positions": (CAUSAL, [4, 5, 6, 7, 24, 25, 26, 27],
                                               [4, 5, 6, 7, 24, 25, 26, 27], cudnn.CAUSAL),
    "causal, same positions not increasing": (CAUSAL, [0, 2, 1, 3], [0, 2, 1, 3], cudnn.PALLAS),
    "window, a zigzag shard's own positions": (Mask(causal=True, window=3), [4, 5, 6, 7, 24, 25, 26, 27],
                                               [4, 5, 6, 7, 24, 25, 26, 27], cudnn.PALLAS),
    "window, aligned": (Mask(causal=True, window=3), range(8), range(8), cudnn.CAUSAL),
    "window, keys in reach": (Mask(causal=True, window=24), range(16, 24), range(8), cudnn.NO_MASK),
    "window, keys partly out of reach": (Mask(causal=True, window=12), range(16, 24), range(8),
                                         cudnn.PALLAS),
}


@pytest.mark.parametrize("name", list(POSITIONS))
def test_position_case(name):
    mask, q_pos, kv_pos, case = POSITIONS[name]
    assert _case(mask, list(q_pos), list(kv_pos)) == case


def test_default_case_is_static():
    assert cudnn.default_case(CAUSAL, 16, 16) == cudnn.CAUSAL
    assert cudnn.default_case(CAUSAL, 8, 16) == cudnn.PALLAS  # lca aligns bottom-right
    assert cudnn.default_case(Mask(), 8, 16) == cudnn.NO_MASK
    # Under jit too: a plain call never needs a run-time switch.
    jax.jit(lambda x: x + cudnn.default_case(CAUSAL, 16, 16)).trace(1)


@pytest.mark.parametrize("n", [2, 4])
def test_zigzag_ring_steps_are_all_cudnn(n):
    """Every chunk rectangle and pair a causal zigzag ring computes is a cuDNN case.

    The ring's visible work (lca.attention.ring): step 0 one call over the whole
    shard; later steps one rectangle, both query chunks x the first key chunk or the
    second query chunk x both key chunks.
    """
    seq, chunk = 8 * n, 4
    for dev in range(n):
        q_pos = layouts.local_positions("zigzag", 2 * chunk, n, dev)
        for step in range(n):
            kv_pos = layouts.local_positions("zigzag", 2 * chunk, n, (dev - step) % n)
            qc, kc = np.split(q_pos, 2), np.split(kv_pos, 2)
            if step == 0:
                calls = [(q_pos, kv_pos)]
            elif kv_pos.min() < q_pos.min():
                calls = [(q_pos, kc[0])]
            else:
                calls = [(qc[1], kv_pos)]
            for qp, kp in calls:
                assert _case(CAUSAL, qp, kp) != cudnn.PALLAS, (seq, dev, step, qp, kp)


# --- without a GPU -----------------------------------------------------------------------------


def test_cpu_says_cuda_is_needed_and_what_works():
    q, k, v, _ = make_inputs(1, 16, 2, 2, 16)
    message = r"impl='cudnn' runs cuDNN's fused attention and needs a CUDA GPU.*'blockwise', 'pallas'"
    with pytest.raises(ValueError, match=message):
        attention(q.astype(BF16), k.astype(BF16), v.astype(BF16), impl="cudnn", causal=True)
    mesh = make_mesh(context=2, devices=jax.devices()[:2])
    with pytest.raises(ValueError, match=message):
        ring_attention(q, k, v, mesh=mesh, impl="cudnn", causal=True)


def test_catalogue_entry_is_a_lazy_step():
    assert IMPLS["cudnn"] == "lca.attention.cudnn:CUDNN"
    local = get_impl("cudnn")
    assert local is cudnn.CUDNN and local.is_step and local.attention is cudnn.cudnn_attention


def test_importing_lca_does_not_import_cudnn():
    code = ("import sys, lca, lca.attention, lca.models, lca.models.strategies; "
            "print('lca.attention.cudnn' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# --- the lse-cotangent fold ------------------------------------------------------------------


@pytest.mark.parametrize("mask", [Mask(), CAUSAL], ids=["full", "causal"])
def test_fold_lse_cotangent_is_exact(mask):
    """A backward *without* dlse on the folded operands gives the gradients *with* dlse."""
    b, t, h, h_kv, d = 2, 12, 4, 2, 8
    q, k, v, _ = make_inputs(b, t, h, h_kv, d, seed=3)
    rng = np.random.default_rng(4)
    dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    dlse = jnp.asarray(rng.standard_normal((b, h, t)), jnp.float32)
    pos = jnp.arange(t, dtype=jnp.int32)
    from lca.attention import blockwise_forward

    out, lse = blockwise_forward(q, k, v, pos, pos, None, None, mask=mask, logit=LOGIT)
    want = blockwise_backward(q, k, v, pos, pos, None, None, out, lse, dout, dlse,
                              mask=mask, logit=LOGIT)
    folded = cudnn.fold_lse_cotangent(q, k, v, out, dout, dlse)
    assert folded[0].shape[-1] == d + cudnn.FOLD_COLUMNS
    qf, kf, vf, outf, doutf = folded
    got = blockwise_backward(qf, kf, vf, pos, pos, None, None, outf, lse, doutf, None,
                             mask=mask, logit=LOGIT)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert rel_err(g[..., :d], w) < 1e-5, name
    plain = blockwise_backward(q, k, v, pos, pos, None, None, out, lse, dout, None,
                               mask=mask, logit=LOGIT)
    assert rel_err(plain[0], want[0]) > 1e-2  # the lse cotangent matters in this case


def _recording_impl(seen):
    """The blockwise step, recording whether each backward got an lse cotangent."""
    base = get_impl("blockwise")

    def backward(*args, **kw):
        seen.append(args[10] is None)
        return base.backward(*args, **kw)

    return LocalImpl("recording", None, base.forward, backward, base.default_blocks)


@pytest.mark.parametrize("with_lse", [False, True])
def test_ring_steps_get_an_lse_cotangent_only_when_lse_is_differentiated(with_lse):
    q, k, v, _ = make_inputs(1, 16, 2, 2, 8)
    mesh = make_mesh(context=2, devices=jax.devices()[:2])
    seen = []
    impl = _recording_impl(seen)

    def loss(q):
        out, lse = ring_attention(q, k, v, mesh=mesh, impl=impl, causal=True, return_lse=True)
        return out.sum() + (lse.sum() if with_lse else 0.0)

    jax.grad(loss)(q)
    assert seen and all(none != with_lse for none in seen), seen


# --- lowering for CUDA from this CPU ---------------------------------------------------------


@pytest.fixture
def as_if_cuda(monkeypatch):
    """Trace ``impl="cudnn"`` here as on a CUDA GPU (pre-Hopper head-dim limit); lowering only."""
    monkeypatch.setattr(cudnn, "require_cuda", lambda: None)


def _cuda_hlo(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


FWD, BWD = "__cudnn$fmhaSoftmax(", "__cudnn$fmhaSoftmaxBackward("

# name -> (q_len, kv_len, options, cuDNN expected, mask type in its config)
LOWERING = {
    "full": (16, 16, dict(), True, "NO_MASK"),
    "causal": (16, 16, dict(causal=True), True, "CAUSAL"),
    "causal window": (16, 16, dict(causal=True, window=4), True, "CAUSAL"),
    "softcap": (16, 16, dict(causal=True, softcap=20.0), False, None),
    "segments": (16, 16, dict(causal=True, segment_ids=jnp.zeros((1, 16), jnp.int32)), False, None),
    "causal bottom-right": (8, 16, dict(causal=True), False, None),
}


@pytest.mark.parametrize("name", list(LOWERING))
def test_cuda_lowering_uses_cudnn_exactly_where_it_can(name, as_if_cuda):
    q_len, kv_len, options, expected, mask_type = LOWERING[name]
    q, k, v, _ = make_inputs(1, q_len, 2, 1, 64, kv_length=kv_len)
    q, k, v = q.astype(BF16), k.astype(BF16), v.astype(BF16)

    def loss(q, k, v):
        return attention(q, k, v, impl="cudnn", **options).astype(jnp.float32).sum()

    hlo = _cuda_hlo(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    assert (FWD in hlo, BWD in hlo) == (expected, expected), name
    if mask_type is not None:
        assert f"mask_type\\22: \\22{mask_type}\\22" in hlo
    if "window" in options:
        assert f"sliding_window_length\\22: {options['window']}" in hlo


def test_cuda_lowering_float32_falls_back(as_if_cuda):
    q, k, v, _ = make_inputs(1, 16, 2, 2, 64)
    hlo = _cuda_hlo(lambda q, k, v: attention(q, k, v, impl="cudnn", causal=True), q, k, v)
    assert "__cudnn$" not in hlo


def test_cuda_lowering_folds_the_lse_cotangent(as_if_cuda):
    """With the lse differentiated, the backward runs cuDNN on head_dim + 8 columns."""
    q, k, v, _ = make_inputs(1, 16, 2, 2, 64)
    q, k, v = q.astype(BF16), k.astype(BF16), v.astype(BF16)

    def loss(q, k, v, with_lse):
        out, lse = attention(q, k, v, impl="cudnn", causal=True, return_lse=True)
        return out.astype(jnp.float32).sum() + (lse.sum() if with_lse else 0.0)

    plain = _cuda_hlo(jax.grad(lambda *a: loss(*a, False), argnums=(0, 1, 2)), q, k, v)
    folded = _cuda_hlo(jax.grad(lambda *a: loss(*a, True), argnums=(0, 1, 2)), q, k, v)
    backward_of = lambda hlo: [line for line in hlo.splitlines() if BWD in line][0]  # noqa: E731
    assert "1x16x2x72xbf16" not in backward_of(plain)
    assert "1x16x2x72xbf16" in backward_of(folded)


def test_cuda_lowering_with_positions_switches_at_run_time(as_if_cuda):
    """Explicit positions (a ring step): cuDNN without mask, cuDNN causal and Pallas, picked by value."""
    q, k, v, _ = make_inputs(1, 16, 2, 2, 64)
    q, k, v = q.astype(BF16), k.astype(BF16), v.astype(BF16)
    pos = jnp.arange(16, dtype=jnp.int32)
    hlo = _cuda_hlo(lambda q, k, v, p: attention(q, k, v, impl="cudnn", causal=True,
                                                 q_positions=p, kv_positions=p), q, k, v, pos)
    assert "case" in hlo and hlo.count(FWD) == 2
    assert "NO_MASK" in hlo and "CAUSAL" in hlo


@pytest.mark.parametrize("n", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_cuda_lowering_of_a_ring_with_cudnn_steps(n, as_if_cuda):
    """The ring's steps lower to cuDNN's calls inside shard_map (n=1: benchmarks/kernels.py's ring1)."""
    q, k, v, _ = make_inputs(1, 32, 2, 1, 64)
    q, k, v = q.astype(BF16), k.astype(BF16), v.astype(BF16)
    mesh = make_mesh(context=n, devices=jax.devices()[:n])

    def loss(q, k, v):
        return ring_attention(q, k, v, mesh=mesh, causal=True, impl="cudnn").astype(jnp.float32).sum()

    hlo = _cuda_hlo(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    assert FWD in hlo and BWD in hlo


def test_cuda_lowering_of_ulysses_and_usp_with_cudnn_steps(as_if_cuda):
    """Ulysses' one local call and USP's ring steps (2 x 2 devices) lower to cuDNN's calls too."""
    q, k, v, _ = make_inputs(1, 64, 4, 2, 64)
    q, k, v = q.astype(BF16), k.astype(BF16), v.astype(BF16)
    ulysses_mesh = make_mesh(context=2, devices=jax.devices()[:2])
    usp_mesh = make_mesh(context=2, tensor=2, devices=jax.devices()[:4])
    calls = {
        "ulysses": lambda q, k, v: ulysses_attention(q, k, v, mesh=ulysses_mesh, causal=True, impl="cudnn"),
        "usp": lambda q, k, v: usp_attention(q, k, v, mesh=usp_mesh, ulysses_axis="tensor", ring_axis="context",
                                             causal=True, impl="cudnn"),
    }
    for name, call in calls.items():
        hlo = _cuda_hlo(jax.grad(lambda *a: call(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2)), q, k, v)
        assert FWD in hlo and BWD in hlo, name


# --- packed documents (cuDNN's ragged layout, sm_90) --------------------------------------------


def _runs_numpy(row, max_runs):
    starts = [i for i in range(len(row)) if i == 0 or row[i] != row[i - 1]]
    lengths = [b - a for a, b in zip(starts, starts[1:] + [len(row)])]
    ids = [row[a] for a in starts]
    exact = len(starts) <= max_runs and len(set(ids)) == len(ids)
    pad = lambda xs, n: (xs + [-1] * n)[:n]  # noqa: E731
    return pad(lengths, max_runs), pad(starts, max_runs + 1), exact


@pytest.mark.parametrize("rows, max_runs", [
    ([[1, 1, 1, 2, 2, 3, 0, 0]], 4),                     # the data pipeline's packing: ids 1, 2, 3, then padding
    ([[5, 5, 5, 5, 5, 5, 5, 5], [1, 2, 3, 4, 5, 6, 7, 8]], 8),  # one document; one token each
    ([[1, 1, 2, 2, 1, 1, 3, 3]], 4),                     # id 1 comes back: not exact
    ([[1, 2, 3, 4, 5, 6, 7, 8]], 4),                     # more runs than slots: not exact
    ([[0, 0, 1, 1, 0, 2, 2, 2]], 4),                     # padding in two places: not exact
])
def test_segment_runs_match_a_direct_count(rows, max_runs):
    seg = jnp.asarray(rows, jnp.int32)
    lengths, starts, exact = jax.jit(cudnn.segment_runs, static_argnums=1)(seg, max_runs)
    want = [_runs_numpy(list(r), max_runs) for r in rows]
    assert np.asarray(lengths).tolist() == [w[0] for w in want]
    assert np.asarray(starts).tolist() == [w[1] for w in want]
    assert bool(exact) == all(w[2] for w in want)


def test_segment_runs_on_random_rows():
    rng = np.random.default_rng(0)
    for _ in range(20):
        # sorted ids: runs of increasing ids (exact when few enough); unsorted: ids may come back
        row = rng.integers(0, 6, 24)
        rows = np.stack([np.sort(row), row])
        lengths, starts, exact = cudnn.segment_runs(jnp.asarray(rows, jnp.int32), 6)
        want = [_runs_numpy(list(r), 6) for r in rows]
        assert np.asarray(lengths).tolist() == [w[0] for w in want]
        assert np.asarray(starts).tolist() == [w[1] for w in want]
        assert bool(exact) == all(w[2] for w in want)
        if exact:  # the runs cover every token
            assert int(np.asarray(lengths)[np.asarray(lengths) > 0].sum()) == 24 * 2


@pytest.fixture
def as_if_hopper(as_if_cuda, monkeypatch):
    """As ``as_if_cuda``, on a GPU that runs cuDNN's packed layout (sm_90)."""
    monkeypatch.setattr(cudnn, "packs_documents", lambda device=None: True)


PACKED = "mask_type\\22: \\22PADDING_CAUSAL\\22"


def _packed_loss(q, k, v, seg, **options):
    return attention(q, k, v, impl="cudnn", segment_ids=seg, **options).astype(jnp.float32).sum()


def test_cuda_lowering_of_packed_documents_on_hopper(as_if_hopper):
    """Segment ids in a plain call: cuDNN's packed call (lengths and offsets), Pallas as the run-time fallback."""
    q, k, v, _ = make_inputs(2, 32, 4, 2, 64)
    q, k, v = q.astype(BF16), k.astype(BF16), v.astype(BF16)
    seg = jnp.asarray(np.repeat([[1, 2, 3, 0]], 8, axis=1).repeat(2, axis=0), jnp.int32)
    hlo = _cuda_hlo(jax.grad(lambda *a: _packed_loss(*a, causal=True), argnums=(0, 1, 2)), q, k, v, seg)
    assert hlo.count(FWD) == 1 and hlo.count(BWD) == 1 and PACKED in hlo
    # cuDNN's operands: q, k, v (GQA repeated to q's 4 heads), q/kv lengths [2, 16], q/kv offsets [2, 17]
    fwd = [line for line in hlo.splitlines() if FWD in line][0]
    assert "tensor<2x16xi32>" in fwd and "tensor<2x17xi32>" in fwd
    assert "tensor<2x32x4x64xbf16>, tensor<2x32x4x64xbf16>, tensor<2x32x4x64xbf16>" in fwd
    assert "stablehlo.case" in hlo  # the run-time choice: other batches run the Pallas kernels
    full = _cuda_hlo(lambda *a: _packed_loss(*a), q, k, v, seg)
    assert "mask_type\\22: \\22PADDING\\22" in full


@pytest.mark.parametrize("name, options", [
    ("lse returned", dict(causal=True, return_lse=True)),
    ("window", dict(causal=True, window=8)),
    ("softcap", dict(causal=True, softcap=20.0)),
    ("explicit positions", dict(causal=True, q_positions=jnp.arange(32, dtype=jnp.int32) + 5,
                                kv_positions=jnp.arange(32, dtype=jnp.int32) + 5)),
])
def test_packed_documents_only_where_exact(name, options, as_if_hopper):
    q, k, v, _ = make_inputs(1, 32, 2, 2, 64)
    q, k, v = q.astype(BF16), k.astype(BF16), v.astype(BF16)
    seg = jnp.asarray(np.repeat([[1, 2]], 16, axis=1), jnp.int32)

    def call(q, k, v):
        out = attention(q, k, v, impl="cudnn", segment_ids=seg, **options)
        return out[0] if isinstance(out, tuple) else out

    assert PACKED not in _cuda_hlo(call, q, k, v), name


def test_packed_documents_need_hopper(as_if_cuda):
    """Before sm_90 (here: no compute capability) segment ids run Pallas, as before."""
    q, k, v, _ = make_inputs(1, 32, 2, 2, 64)
    q, k, v = q.astype(BF16), k.astype(BF16), v.astype(BF16)
    seg = jnp.ones((1, 32), jnp.int32)
    assert "__cudnn$" not in _cuda_hlo(lambda *a: _packed_loss(*a, causal=True), q, k, v, seg)
