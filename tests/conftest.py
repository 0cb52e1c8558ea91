"""Shared fixtures and independent reference implementations for the MoE layer tests.

Everything here is deliberately written as plain Python loops over tokens / pairs, sharing no code
with ``xmoe`` beyond reading module parameters, so that the tests compare the vectorised layer
against a brute-force oracle.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xmoe import MoE

D_MODEL = 16  # multiples of 4 so backend="grouped_mm" accepts fp32
D_EXPERT = 8
NUM_EXPERTS = 4


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(1234)
    yield


def make_moe(**overrides) -> MoE:
    """A small MoE with a router init large enough that tokens disagree on their experts."""
    kwargs = dict(
        d_model=D_MODEL,
        num_experts=NUM_EXPERTS,
        d_expert=D_EXPERT,
        router="threshold",
        backend="loop",
    )
    kwargs.update(overrides)
    if isinstance(kwargs["router"], str):
        kwargs.setdefault("init_std", 0.5)
    return MoE(**kwargs)


# --------------------------------------------------------------------------------------------
# Expert oracle
# --------------------------------------------------------------------------------------------


def _act(name: str, h: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(h)  # exact erf gelu
    if name == "relu":
        return torch.relu(h)
    if name == "silu":
        return h * torch.sigmoid(h)
    raise AssertionError(f"unexpected activation {name}")


def expert_apply(experts, e: int, v: torch.Tensor) -> torch.Tensor:
    """One expert on one (or several) rows, straight from the stacked weights."""
    h = v @ experts.w1[e]
    if experts.b1 is not None:
        h = h + experts.b1[e]
    if experts.activation == "swiglu":
        g = v @ experts.w3[e]
        if experts.b3 is not None:
            g = g + experts.b3[e]
        h = (h * torch.sigmoid(h)) * g
    else:
        h = _act(experts.activation, h)
    y = h @ experts.w2[e]
    if experts.b2 is not None:
        y = y + experts.b2[e]
    return y


def loop_oracle(x, token_idx, expert_idx, weight, experts) -> torch.Tensor:
    """``out[t] = sum over pairs (t, e, w) of w * expert_e(x[t])``, one Python step per pair."""
    n, d = x.shape
    rows = [x.new_zeros(d) for _ in range(n)]
    for t, e, w in zip(token_idx.tolist(), expert_idx.tolist(), weight.unbind(0), strict=True):
        rows[t] = rows[t] + w * expert_apply(experts, e, x[t])
    if n == 0:
        return x.new_zeros(0, d)
    return torch.stack(rows, 0)


def dense_mixture(x, probs, experts) -> torch.Tensor:
    """``sum_e p[:, e] * expert_e(x)`` over all experts, vectorised per expert."""
    out = x.new_zeros(x.shape)
    for e in range(experts.num_experts):
        out = out + probs[:, e : e + 1] * expert_apply(experts, e, x)
    return out


# --------------------------------------------------------------------------------------------
# Routing references
# --------------------------------------------------------------------------------------------


def router_probs(x, router, noise_eps=None) -> torch.Tensor:
    """``softmax(x @ W.T)`` (plus Shazeer noise when ``noise_eps`` is given), differentiable."""
    logits = x.float() @ router.weight.float().T
    if noise_eps is not None:
        logits = logits + noise_eps * F.softplus(x.float() @ router.noise_weight.float().T)
    return torch.softmax(logits, dim=-1)


def ranked_experts(p_row: list[float]) -> list[int]:
    """Experts sorted by probability, descending; ties broken by lower expert index."""
    return sorted(range(len(p_row)), key=lambda e: (-p_row[e], e))


def reference_threshold(probs: torch.Tensor, t: float, max_experts: int | None = None):
    """Per-token loop of the XMoE threshold rule.

    Returns a list (one per token) of ``[(expert, rank), ...]``: rank ``r`` is kept iff the sum of
    the strictly higher-ranked probabilities is ``< t``; ``t >= 1`` keeps everything.
    """
    out = []
    for row in probs.detach().double().tolist():
        order = ranked_experts(row)
        kept, mass_before = [], 0.0
        for r, e in enumerate(order):
            if max_experts is not None and r >= max_experts:
                break
            if t >= 1.0 or mass_before < t:
                kept.append((e, r))
            mass_before += row[e]
        out.append(kept)
    return out


def reference_topk(probs: torch.Tensor, k: int):
    """Per-token loop: the ``k`` most probable experts with their ranks."""
    out = []
    for row in probs.detach().double().tolist():
        order = ranked_experts(row)
        out.append([(e, r) for r, e in enumerate(order[:k])])
    return out


def reference_selection(probs, router):
    """Dispatch to the reference rule matching ``router``'s configuration."""
    from xmoe import ThresholdRouter, TopKRouter

    if isinstance(router, ThresholdRouter):
        return reference_threshold(probs, router.threshold, router.max_experts)
    assert isinstance(router, TopKRouter)
    return reference_topk(probs, router.k)


def reference_capacity(selection, probs, capacity: int | None, num_experts: int):
    """Apply the capacity policy to a per-token selection, with explicit per-expert sorting.

    Each expert admits its ``capacity`` best candidates by (rank asc, score desc, token asc).
    Returns the kept set of ``(token, expert)`` pairs.
    """
    p = probs.detach().double().tolist()
    pairs = {(t, e) for t, sel in enumerate(selection) for e, _ in sel}
    if capacity is None:
        return pairs
    kept = set()
    for e in range(num_experts):
        cands = [(r, -p[t][e], t) for t, sel in enumerate(selection) for ee, r in sel if ee == e]
        cands.sort()
        kept.update((t, e) for _, _, t in cands[:capacity])
    return kept


def capacity_for(cf: float | None, n: int, e: int) -> int | None:
    return None if cf is None else math.ceil(cf * n / e)


def oracle_pair_weights(probs, selection, token_idx, expert_idx, renormalize: bool):
    """Combine weight of each given pair, recomputed from ``probs`` (differentiable).

    With ``renormalize`` the divisor is the token's mass over its *selected* experts (before any
    capacity drop), computed from the independent reference selection.
    """
    ws = []
    for t, e in zip(token_idx.tolist(), expert_idx.tolist(), strict=True):
        w = probs[t, e]
        if renormalize:
            w = w / sum(probs[t, ee] for ee, _ in selection[t])
        ws.append(w)
    if not ws:
        return probs.new_zeros(0)
    return torch.stack(ws)


def pair_set(routing) -> set[tuple[int, int]]:
    return set(zip(routing.token_idx.tolist(), routing.expert_idx.tolist(), strict=True))


def expert_params(moe) -> dict[str, torch.Tensor]:
    return {n: p for n, p in moe.experts.named_parameters()}


def assert_grads_match(y, y_ref, params: dict, atol: float = 1e-5) -> dict:
    """Gradients of a fixed random projection of ``y`` and of the oracle ``y_ref`` agree for every
    tensor in ``params``; returns the oracle's gradients by name (zeros where unused)."""
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    names, tensors = list(params), list(params.values())
    grads = torch.autograd.grad((y * g).sum(), tensors, allow_unused=True, retain_graph=True)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), tensors, allow_unused=True)
    out = {}
    for name, got, want in zip(names, grads, grads_ref, strict=True):
        got = torch.zeros_like(params[name]) if got is None else got
        want = torch.zeros_like(params[name]) if want is None else want
        torch.testing.assert_close(
            got, want, atol=atol, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
        out[name] = want
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test: the tiny tensors here run fastest that way, and the suite
    stays quick when another job shares the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A tiny GPT (2 layers, d_model 16, 4 experts x 8) as config overrides, shared by the
# train/CLI/distributed tests; each adds its own train.* settings.
TINY_MODEL = [
    "model.vocab_size=300",
    "data.vocab_size=300",
    "model.block_size=16",
    "model.n_layer=2",
    "model.n_head=2",
    "model.d_model=16",
    "model.d_ff=32",
    "model.moe.num_experts=4",
    "model.moe.d_expert=8",
]

# TINY_MODEL plus the train settings of a seconds-long CLI run.
TINY = [
    *TINY_MODEL,
    "train.batch_size=4",
    "train.eval_batch_size=8",
    "train.eval_tokens=256",
    "train.warmup_steps=2",
    "train.log_every=1",
]


def sets(*items: str) -> list[str]:
    """``--set`` arguments for TINY plus ``items``."""
    out = []
    for item in (*TINY, *items):
        out += ["--set", item]
    return out


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """Path of a small UTF-8 corpus (30k characters of Shakespeare) for seconds-long runs."""
    from xmoe.data import shakespeare_documents

    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(shakespeare_documents()[5].text[:30_000])
    return str(path)
