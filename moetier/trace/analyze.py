"""Routing statistics of a trace, a markdown summary and PNG plots (`moetier trace analyze`).

Legend: L MoE layers, N tokens, K experts per token, E experts.

Definitions (per MoE layer; tokens of a sequence ordered by position):
- popularity: load of expert e = (times e was chosen) / (N * K); the sorted load curve; entropy of
  the load in bits (log2 E when uniform); max/mean = the busiest expert's count over the mean count.
- temporal locality: over every (token t, expert e chosen at t) with at least w later tokens in the
  same sequence, the fraction for which e is chosen again at one of the tokens t+1 .. t+w.
  Reuse distance: tokens until e is chosen again in the same sequence (1 = the next token),
  averaged over the pairs where that happens.
- inter-layer affinity, consecutive MoE layers (l, l+1): C[a, b] counts the tokens choosing a at l
  and b at l+1; P(b | a) = C[a, b] / sum_b C[a, b] (each row sums to 1). Top-m mass: the m largest
  entries of row a summed, averaged over a weighted by a's popularity at l (uniform routing: m / E).
- co-activation (one layer, K >= 2): M[a, b] counts the tokens choosing both a and b; P(b | a) =
  M[a, b] / n_a (summing to K - 1 over b). Partner share: the K - 1 largest P(b | a) summed over
  K - 1, averaged weighted by n_a: how much of a's company its K - 1 usual partners keep (uniform
  top-K routing: (K - 1) / (E - 1); 1 when a always comes with the same experts). Clusters: average-linkage clustering (scipy) of the experts on
  1 - M[a, b] / sqrt(n_a n_b) (the cosine similarity of their token sets), cut into G groups;
  within share = the co-activated pairs that fall inside a group over all of them, beside the share
  a random grouping of the same sizes gets: sum_g s_g (s_g - 1) / (E (E - 1)). A high within share
  says experts could be placed (on one GPU) or batched by group.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moetier.trace.format import RoutingTrace

WINDOWS = (1, 4, 16)
TOP_MASSES = (1, 4)


@dataclass
class LayerStats:
    layer: int
    load_E: np.ndarray  # fraction of assignments per expert, sums to 1
    entropy_bits: float
    max_over_mean: float
    reuse_within: dict[int, float]  # window -> probability (nan: no token has that many successors)
    mean_reuse_distance: float


def popularity(ids_NK: np.ndarray, num_experts: int) -> tuple[np.ndarray, float, float]:
    counts_E = np.bincount(ids_NK.reshape(-1).astype(np.int64), minlength=num_experts).astype(np.float64)
    total = counts_E.sum()
    if total == 0:
        return counts_E, float("nan"), float("nan")
    load_E = counts_E / total
    nz = load_E[load_E > 0]
    return load_E, float(-(nz * np.log2(nz)).sum()), float(counts_E.max() / counts_E.mean())


def sequence_order(trace: RoutingTrace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token order by (sequence, position); each token's rank in its sequence; tokens after it."""
    order = np.lexsort((trace.position, trace.seq_id))
    seq = trace.seq_id[order]
    starts = np.r_[0, np.flatnonzero(np.diff(seq)) + 1] if len(seq) else np.zeros(0, np.int64)
    lengths = np.diff(np.r_[starts, len(seq)])
    rank = np.arange(len(seq)) - np.repeat(starts, lengths)
    remaining = np.repeat(lengths, lengths) - 1 - rank
    return order, rank, remaining


def reuse(ids_NK: np.ndarray, seq_N: np.ndarray, rank_N: np.ndarray, remaining_N: np.ndarray,
          windows=WINDOWS) -> tuple[dict[int, float], float]:
    """Temporal locality of one layer; tokens already in (sequence, position) order."""
    n, k = ids_NK.shape
    expert = ids_NK.reshape(-1).astype(np.int64)
    tok = np.repeat(np.arange(n), k)
    order = np.lexsort((rank_N[tok], seq_N[tok], expert))  # pairs grouped by expert, then sequence, in time
    e_s, s_s, r_s = expert[order], seq_N[tok][order], rank_N[tok][order]
    distance = np.full(len(order), np.inf)
    same = (e_s[1:] == e_s[:-1]) & (s_s[1:] == s_s[:-1])
    distance[:-1][same] = (r_s[1:] - r_s[:-1])[same]
    remaining = remaining_N[tok][order]
    within = {}
    for w in windows:
        eligible = remaining >= w
        within[w] = float((distance[eligible] <= w).mean()) if eligible.any() else float("nan")
    finite = distance[np.isfinite(distance)]
    return within, float(finite.mean()) if len(finite) else float("nan")


def affinity(ids_l_NK: np.ndarray, ids_next_NK: np.ndarray, num_experts: int) -> np.ndarray:
    """P(b at l+1 | a at l) as an [E, E] matrix (rows of never-chosen a are 0)."""
    k = ids_l_NK.shape[1]
    a = np.repeat(ids_l_NK.astype(np.int64), k, axis=1).reshape(-1)
    b = np.tile(ids_next_NK.astype(np.int64), (1, k)).reshape(-1)
    counts = np.bincount(a * num_experts + b, minlength=num_experts * num_experts).reshape(num_experts, num_experts)
    rows = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)


def predicted_share(p_EE: np.ndarray, ids_l_NK: np.ndarray, ids_next_NK: np.ndarray) -> float:
    """How much of each token's K experts at l+1 an affinity predictor names: the K experts with the
    highest sum of P(. | a) over the token's experts a at l (a prefetcher's guess, made before l+1's
    router runs). 1.0: always right; uniform routing: K / E."""
    k = ids_next_NK.shape[1]
    score_NE = p_EE[ids_l_NK.astype(np.int64)].sum(axis=1)
    predicted_NK = np.argpartition(-score_NE, k - 1, axis=1)[:, :k]
    right = (predicted_NK[:, :, None] == ids_next_NK[:, None, :].astype(np.int64)).any(axis=2)
    return float(right.mean()) if right.size else float("nan")


def held_out_prediction(trace: RoutingTrace, i: int) -> float:
    """predicted_share from MoE layer i to i+1, the affinity fitted on the first half of the
    sequences and scored on the others (nan for a single sequence)."""
    seqs = np.unique(trace.seq_id)
    if len(seqs) < 2:
        return float("nan")
    fit_N = np.isin(trace.seq_id, seqs[: len(seqs) // 2])
    ids, following = trace.expert_ids[i], trace.expert_ids[i + 1]
    p_EE = affinity(ids[fit_N], following[fit_N], trace.num_experts)
    return predicted_share(p_EE, ids[~fit_N], following[~fit_N])


def top_mass(p_EE: np.ndarray, load_E: np.ndarray, m: int) -> float:
    """The mass of each row's m largest entries, averaged over rows weighted by load_E."""
    mass_E = -np.sort(-p_EE, axis=1)[:, :m].sum(axis=1)
    return float((mass_E * load_E).sum() / load_E.sum()) if load_E.sum() else float("nan")


def coactivation(ids_NK: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(M [E, E]: tokens choosing both a and b, zero diagonal; n [E]: tokens choosing a)."""
    incidence_NE = np.zeros((ids_NK.shape[0], num_experts))
    np.put_along_axis(incidence_NE, ids_NK.astype(np.int64), 1.0, axis=1)
    both_EE = incidence_NE.T @ incidence_NE
    chosen_E = np.diag(both_EE).copy()
    np.fill_diagonal(both_EE, 0.0)
    return both_EE, chosen_E


def partner_share(both_EE: np.ndarray, chosen_E: np.ndarray, partners: int) -> float:
    p_EE = np.divide(both_EE, chosen_E[:, None], out=np.zeros(both_EE.shape), where=chosen_E[:, None] > 0)
    return top_mass(p_EE, chosen_E, partners) / partners


@dataclass
class Clusters:
    labels_E: np.ndarray  # group of each expert, 1..G
    within_share: float  # co-activated pairs inside a group / all co-activated pairs
    random_share: float  # the same for a random grouping of the same sizes


def clusters(both_EE: np.ndarray, chosen_E: np.ndarray, groups: int) -> Clusters:
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    scale_E = np.sqrt(np.maximum(chosen_E, 1.0))
    distance_EE = 1.0 - both_EE / np.outer(scale_E, scale_E)
    np.fill_diagonal(distance_EE, 0.0)
    labels_E = fcluster(linkage(squareform(np.clip(distance_EE, 0.0, None), checks=False), "average"),
                        t=groups, criterion="maxclust")
    same_EE = labels_E[:, None] == labels_E[None, :]
    total = both_EE.sum()
    sizes = np.bincount(labels_E)
    num_experts = len(chosen_E)
    return Clusters(labels_E, float(both_EE[same_EE].sum() / total) if total else float("nan"),
                    float((sizes * (sizes - 1)).sum() / (num_experts * (num_experts - 1))))


@dataclass
class TraceStats:
    layers: list[LayerStats]
    affinity: list[np.ndarray]  # per consecutive MoE-layer pair
    affinity_mass: list[dict[int, float]]
    predicted: list[float]  # per pair: held_out_prediction
    partner_share: list[float]  # per layer (nan for top-1 routing)
    clusters: list[Clusters | None]  # per layer (None for top-1 routing)


def analyze(trace: RoutingTrace) -> TraceStats:
    order, rank, remaining = sequence_order(trace)
    seq = trace.seq_id[order]
    layers = []
    for i, layer in enumerate(trace.moe_layers.tolist()):
        ids_NK = trace.expert_ids[i][order]
        load_E, entropy, max_mean = popularity(ids_NK, trace.num_experts)
        within, distance = reuse(ids_NK, seq, rank, remaining)
        layers.append(LayerStats(layer, load_E, entropy, max_mean, within, distance))
    pairs = [affinity(trace.expert_ids[i], trace.expert_ids[i + 1], trace.num_experts)
             for i in range(len(trace.moe_layers) - 1)]
    masses = [{m: top_mass(p, layers[i].load_E, m) for m in TOP_MASSES} for i, p in enumerate(pairs)]
    predicted = [held_out_prediction(trace, i) for i in range(len(pairs))]
    partners, groups = [], []
    for i in range(len(trace.moe_layers)):
        if trace.top_k < 2:
            partners.append(float("nan"))
            groups.append(None)
            continue
        both_EE, chosen_E = coactivation(trace.expert_ids[i], trace.num_experts)
        partners.append(partner_share(both_EE, chosen_E, trace.top_k - 1))
        groups.append(clusters(both_EE, chosen_E, cluster_groups(trace.num_experts)))
    return TraceStats(layers, pairs, masses, predicted, partners, groups)


def cluster_groups(num_experts: int) -> int:
    """Groups the co-activation clustering cuts into: 8 (as many GPUs as a node has), fewer for few experts."""
    return max(2, min(8, num_experts // 4))


def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if np.isnan(v) else f"{v:.{digits}f}"


def summary_markdown(trace: RoutingTrace, stats: TraceStats) -> str:
    n_decode = int(trace.phase.sum())
    E, K = trace.num_experts, trace.top_k
    lines = [
        f"# Routing trace: {trace.model_id}", "",
        (f"{trace.num_tokens} tokens ({trace.num_tokens - n_decode} prefill, {n_decode} decode) in "
         f"{len(np.unique(trace.seq_id))} sequences; {len(trace.moe_layers)} MoE layers of {trace.num_layers}, "
         f"{E} experts, top-{K}."), "",
        "## Expert popularity and temporal locality", "",
        (f"Entropy in bits (uniform: {np.log2(E):.3f}); reuse: P(an expert chosen at token t is chosen again "
         "within the next w tokens of the sequence); distance in tokens."), "",
        ("| layer | entropy | max/mean | top expert load | " + " | ".join(f"reuse w={w}" for w in WINDOWS)
         + " | mean reuse distance |"),
        "|---|---|---|---|" + "---|" * len(WINDOWS) + "---|",
    ]
    for s in stats.layers:
        lines.append(f"| {s.layer} | {_fmt(s.entropy_bits)} | {_fmt(s.max_over_mean)} | {_fmt(s.load_E.max())} | "
                     + " | ".join(_fmt(s.reuse_within[w]) for w in WINDOWS) + f" | {_fmt(s.mean_reuse_distance, 2)} |")
    if stats.affinity:
        lines += ["", "## Inter-layer affinity", "",
                  ("Mass of the m most likely experts at layer l+1 given one expert at layer l "
                   f"(uniform routing: {', '.join(f'm={m}: {m / E:.3f}' for m in TOP_MASSES)}). Predicted: the "
                   f"share of a token's {K} experts at l+1 named by the {K} with the highest summed P(. | a) over "
                   f"its experts a at l, fitted on half the sequences, scored on the rest (uniform: {K / E:.3f})."),
                  "", "| layers | " + " | ".join(f"top-{m} mass" for m in TOP_MASSES) + " | predicted |",
                  "|---|" + "---|" * len(TOP_MASSES) + "---|"]
        moe = trace.moe_layers.tolist()
        for i, (mass, right) in enumerate(zip(stats.affinity_mass, stats.predicted)):
            lines.append(f"| {moe[i]} -> {moe[i + 1]} | " + " | ".join(_fmt(mass[m]) for m in TOP_MASSES)
                         + f" | {_fmt(right)} |")
    if any(c is not None for c in stats.clusters):
        E1 = E - 1
        lines += ["", "## Co-activation", "",
                  (f"Partner share: of the experts chosen with one, the part its {K - 1} usual partners make up "
                   f"(uniform: {(K - 1) / E1:.3f}). Clusters: experts grouped into {cluster_groups(E)} by how often "
                   "they are chosen together; the share of co-chosen pairs inside a group, beside a random "
                   "grouping of the same sizes."), "",
                  "| layer | partner share | within-group share | random grouping | group sizes |",
                  "|---|---|---|---|---|"]
        for s_, mass, c in zip(stats.layers, stats.partner_share, stats.clusters):
            sizes = sorted(np.bincount(c.labels_E)[1:].tolist(), reverse=True)
            lines.append(f"| {s_.layer} | {_fmt(mass)} | {_fmt(c.within_share)} | {_fmt(c.random_share)} | "
                         f"{', '.join(map(str, sizes))} |")
    return "\n".join(lines) + "\n"


def write_report(trace: RoutingTrace, out_dir: str | Path) -> list[Path]:
    """summary.md plus popularity.png, locality.png, affinity.png (two MoE layers or more) and
    coactivation.png (top-k >= 2) in out_dir; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = analyze(trace)
    paths = [out / "summary.md", out / "popularity.png", out / "locality.png"]
    paths[0].write_text(summary_markdown(trace, stats))

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in stats.layers:
        ax.plot(np.arange(1, trace.num_experts + 1), np.sort(s.load_E)[::-1], label=f"layer {s.layer}", lw=1)
    ax.axhline(1 / trace.num_experts, color="k", ls="--", lw=0.8, label="uniform")
    ax.set(xlabel="expert rank", ylabel="share of assignments", title="Expert popularity (sorted load)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(stats.layers))
    for j, w in enumerate(WINDOWS):
        ax.bar(x + (j - 1) * 0.27, [s.reuse_within[w] for s in stats.layers], 0.27, label=f"within {w}")
    ax.set_xticks(x, [str(s.layer) for s in stats.layers])
    ax.set(xlabel="MoE layer", ylabel="P(reused)", ylim=(0, 1), title="Temporal locality")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)

    if stats.affinity:
        paths.append(out / "affinity.png")
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        im = axes[0].imshow(stats.affinity[0], cmap="viridis", aspect="auto")
        moe = trace.moe_layers.tolist()
        axes[0].set(xlabel=f"expert at layer {moe[1]}", ylabel=f"expert at layer {moe[0]}", title="P(next | current)")
        fig.colorbar(im, ax=axes[0])
        for m in TOP_MASSES:
            axes[1].plot([mass[m] for mass in stats.affinity_mass], marker="o", label=f"top-{m} mass")
            axes[1].axhline(m / trace.num_experts, ls="--", lw=0.8, color="gray")
        axes[1].set(xlabel="layer pair index", ylabel="mass", ylim=(0, 1), title="Inter-layer affinity")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(paths[3], dpi=120)
        plt.close(fig)
    first = next((i for i, c in enumerate(stats.clusters) if c is not None), None)
    if first is not None:
        paths.append(out / "coactivation.png")
        both_EE, chosen_E = coactivation(trace.expert_ids[first], trace.num_experts)
        p_EE = np.divide(both_EE, chosen_E[:, None], out=np.zeros(both_EE.shape), where=chosen_E[:, None] > 0)
        order = np.argsort(stats.clusters[first].labels_E, kind="stable")
        fig, ax = plt.subplots(figsize=(5, 4))
        im = ax.imshow(p_EE[np.ix_(order, order)], cmap="viridis", aspect="auto")
        layer = trace.moe_layers.tolist()[first]
        ax.set(xlabel="expert b (by group)", ylabel="expert a (by group)", title=f"P(b chosen with a), layer {layer}")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
