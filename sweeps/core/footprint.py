"""What a model and a sweep take, from shapes alone: parameters, bytes, FLOPs, placement.

``interp-sweeps plan`` prints these before any weights load, so a user knows whether a run
fits and how long it takes before renting the machines. Everything here is arithmetic on a
``ModelShape`` (read from a config file) and the sweep's sizes; the byte counts follow what
the code holds:

- the weights as the fast path keeps them (``transformer.ModelWeights``): the unembedding
  apart from the embedding even where a checkpoint ties them, in the run's dtype;
- the clean state a job keeps for the whole task (``BatchState``, the scale sweep's clean
  runs, attribution's upstream changes, circuit evaluation's corrupt writes);
- one pass: the activations of one block for the tokens of a pass (a restart frees each
  block's activations as it goes), or attribution's per-token budget.

A replica larger than one device is split into contiguous stages of layers balanced by
bytes (``stages``), the embeddings with the first and the unembedding with the last.

Plain arithmetic; no torch tensors, no Ray, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """A decoder's sizes, as its config gives them."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    gated_mlp: bool = True
    has_mlp: bool = True
    learned_positions: bool = False
    parallel: bool = False  # attention and MLP read the same stream (GPT-NeoX, GPT-J): fewer edges
    post_norm: bool = False  # a norm after each sublayer (Gemma 2/3, OLMo 2): two weights of D a layer
    qk_norm: str = "none"  # "head" (one of d_head for q and for k) | "all" (over every head: OLMo 2)
    final_softcap: bool = False  # soft-capped logits: the backup sweep keeps each point's final stream
    family: str = ""

    # -- parameters ------------------------------------------------------------------

    def layer_parameters(self) -> int:
        """One block as the fast path holds it: q/k/v/o projections and their biases (zero
        where the checkpoint has none), the MLP, and the norms that cannot be folded (pre-norms
        are folded into the matrices that read them)."""
        D, H, K, E, M = self.d_model, self.n_heads, self.n_kv_heads, self.d_head, self.d_mlp
        attention = D * H * E + H * E + 2 * (D * K * E + K * E) + H * E * D + D
        mlp = (D * M * (3 if self.gated_mlp else 2) + M + D) if self.has_mlp else 0
        norms = (2 * D if self.post_norm else 0) + {"none": 0, "head": 2 * E, "all": (H + K) * E}[self.qk_norm]
        return attention + mlp + norms

    def embedding_parameters(self) -> int:
        return self.d_vocab * self.d_model + (self.n_ctx * self.d_model if self.learned_positions else 0)

    def unembedding_parameters(self) -> int:
        """``W_U``, ``b_U``, and their means over the vocabulary that centring removed (kept to
        rebuild soft-capped logits)."""
        return self.d_model * self.d_vocab + self.d_vocab + self.d_model + 1

    @property
    def parameters(self) -> int:
        """Every weight the fast path holds (an untied unembedding included)."""
        return self.embedding_parameters() + self.n_layers * self.layer_parameters() + self.unembedding_parameters()

    def forward_flops(self, tokens: int, seq_len: int) -> float:
        """Multiply-adds × 2 of one forward pass over ``tokens`` tokens of prompts of ``seq_len``:
        every matrix product (the embedding lookup is free) and attention's two products."""
        matrices = self.n_layers * self.layer_parameters() + self.unembedding_parameters()
        attention = self.n_layers * 2 * self.n_heads * self.d_head * seq_len  # q·k and pattern·v, per token
        return 2.0 * tokens * (matrices + attention)

    def block_activations(self) -> int:
        """Numbers one token holds while one block runs (the stream, its normalised copy,
        q/k/v and grouped-query copies of k/v, z, the writes, the MLP's hidden layers)."""
        D, H, E, M = self.d_model, self.n_heads, self.d_head, self.d_mlp
        mlp = (3 if self.gated_mlp else 2) * M if self.has_mlp else 0
        return 8 * D + 5 * H * E + mlp


def shape_of_config(cfg, n_ctx: int = 0) -> ModelShape:
    """A loaded model's shape, from its config (the fast path's ``ModelConfig`` or the
    bridge's TransformerLens config: the fields both have)."""
    n_heads = int(cfg.n_heads)
    return ModelShape(
        n_layers=int(cfg.n_layers),
        d_model=int(cfg.d_model),
        n_heads=n_heads,
        n_kv_heads=int(getattr(cfg, "n_kv_heads", None) or getattr(cfg, "n_key_value_heads", None) or n_heads),
        d_head=int(cfg.d_head),
        d_mlp=int(cfg.d_mlp or 0),
        d_vocab=int(cfg.d_vocab),
        n_ctx=n_ctx,
        gated_mlp=bool(getattr(cfg, "gated_mlp", False)),
        has_mlp=not bool(getattr(cfg, "attn_only", False)),
        learned_positions=n_ctx > 0,
        parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
        post_norm=bool(getattr(cfg, "post_norm", False)),
        qk_norm=str(getattr(cfg, "qk_norm", "none")),
        final_softcap=bool(getattr(cfg, "final_softcap", 0.0)),
    )


@dataclass(frozen=True)
class Footprint:
    """One replica's memory and one sweep's compute."""

    weight_bytes: int
    clean_bytes: int  # what the job keeps for the whole task
    pass_bytes: int  # the transient memory of a pass as the job sizes it
    least_pass_bytes: int  # of the smallest pass there is (one head, one row, one prompt)
    flops: float
    passes: int
    notes: list[str] = field(default_factory=list)

    @property
    def per_replica_bytes(self) -> int:
        return self.weight_bytes + self.clean_bytes + self.pass_bytes


def stages(shape: ModelShape, k: int, dtype_bytes: int) -> list[tuple[range, int]]:
    """The layers of each of ``k`` contiguous stages and their weight bytes, the largest stage as
    small as it can be (the embeddings go with the first stage, the unembedding with the last).

    Found by bisection on the largest stage's bytes: for a bound, packing layers greedily
    from the first shows whether ``k`` stages suffice."""
    if k < 1:
        raise ValueError("a replica has at least one stage")
    L = shape.n_layers
    k = min(k, L)
    layer = shape.layer_parameters() * dtype_bytes
    first, last = shape.embedding_parameters() * dtype_bytes, shape.unembedding_parameters() * dtype_bytes
    sizes = [layer] * L
    sizes[0] += first
    sizes[-1] += last

    def pack(bound: int) -> list[int] | None:
        """Stage boundaries (the first layer of each stage after the first), or None."""
        cuts: list[int] = []
        used = 0
        for i, b in enumerate(sizes):
            if used + b > bound:
                if b > bound or len(cuts) == k - 1:
                    return None
                cuts.append(i)
                used = 0
            used += b
        return cuts

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if pack(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    cuts = pack(lo) or []
    # Every stage gets at least one layer: split the largest stages further while there are fewer than k.
    bounds = [0, *cuts, L]
    while len(bounds) - 1 < k:
        widest = max(range(len(bounds) - 1), key=lambda i: bounds[i + 1] - bounds[i])
        a, b = bounds[widest], bounds[widest + 1]
        bounds.insert(widest + 1, (a + b) // 2)
    return [(range(a, b), sum(sizes[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]


def backup(
    shape: ModelShape,
    n_prompts: int,
    seq_len: int,
    batch_size: int,
    dtype_bytes: int,
    tokens_per_pass: int,
    heads: int,
    ablation: str = "resample",
    self_repair: bool = True,
    points_per_prompt: int = 1,
) -> Footprint:
    """The backup sweep (``jobs.backup.BatchState``): per prompt the block inputs, the corrupt
    run's ``z`` to resample from, and for the self-repair split two numbers per neuron of the
    last MLP at each point are kept for the whole task; a pass restarts ``G`` copies of a
    batch from the ablated head's layer, after the clean and corrupt runs of each batch
    (which hold every layer's inputs, ``z`` and MLP writes while they run)."""
    L, D, H, E, M = shape.n_layers, shape.d_model, shape.n_heads, shape.d_head, shape.d_mlp
    per_token = L * D + (L * H * E if ablation == "resample" else 0)
    # at each point: every head's, MLP's and b_O's clean direct effect, the neurons' directions
    # and clean effects, the final stream of a soft-capped model, and a few scalars
    per_point = L * (H + 2) + (2 * M if self_repair and shape.has_mlp else 0) + (D if shape.final_softcap else 0) + 6
    clean = n_prompts * (seq_len * per_token + points_per_prompt * per_point) * dtype_bytes
    B = min(batch_size, n_prompts)
    copies = max(1, tokens_per_pass // (B * seq_len))
    per_token_pass = (shape.block_activations() + D) * dtype_bytes
    # Building a batch's state: its clean and corrupt runs are alive at once, each with every
    # layer's inputs, z and MLP writes recorded per layer and then stacked (two copies).
    clean_run = 4 * B * seq_len * (2 * L * D + L * H * E + M) * dtype_bytes
    batches = -(-n_prompts // B)
    # the last batch's runs come before its own state is kept: the peak is the larger of that
    # moment and a restart with every batch's state kept
    building = clean_run - clean // batches
    pass_bytes = max(min(copies, H) * B * seq_len * per_token_pass, building)
    # a head's restart runs the layers from its own on: half the model on average
    flops = 2 * shape.forward_flops(n_prompts * seq_len, seq_len) + heads * 0.5 * shape.forward_flops(
        n_prompts * seq_len, seq_len
    )
    return Footprint(
        shape_bytes(shape, dtype_bytes),
        clean,
        pass_bytes,
        max(B * seq_len * per_token_pass, building),
        flops,
        batches * -(-heads // min(copies, H)),
    )


def scale(
    shape: ModelShape,
    n_prompts: int,
    seq_len: int,
    dtype_bytes: int,
    tokens_per_pass: int,
    nodes: int,
    rows_per_node: int,
    corrupt_source: bool = False,
) -> Footprint:
    """The scale sweep (``jobs.scale.LengthGroup``): every prompt's clean run is kept (and the
    corrupt one's when patches come from it); while the state is built, a run's per-layer
    records and their stacked copy are alive beside it (the corrupt run is always made, for
    the normaliser); a pass runs ``tokens_per_pass // T`` (scale, pair) rows of one node."""
    L, D, H, E = shape.n_layers, shape.d_model, shape.n_heads, shape.d_head
    run = L * D + L * H * E + L * D + D  # block inputs, z, MLP writes, the final stream
    run_bytes = n_prompts * seq_len * run * dtype_bytes
    clean = run_bytes * (2 if corrupt_source else 1)
    building = 2 * run_bytes
    rows = max(1, tokens_per_pass // seq_len)
    per_row = seq_len * (shape.block_activations() + 2 * D) * dtype_bytes
    pass_bytes = max(min(rows, rows_per_node) * per_row, building)
    flops = nodes * rows_per_node * 0.5 * shape.forward_flops(seq_len, seq_len) + 2 * shape.forward_flops(
        n_prompts * seq_len, seq_len
    )
    return Footprint(
        shape_bytes(shape, dtype_bytes),
        clean,
        pass_bytes,
        max(per_row, building),
        flops,
        nodes * -(-rows_per_node // rows),
    )


def attribution(
    shape: ModelShape,
    n_prompts: int,
    seq_len: int,
    batch_size: int,
    dtype_bytes: int,
    steps: int = 1,
    budget_bytes: int = 2 << 30,
) -> Footprint:
    """The attribution sweep: a pass holds every upstream node's change for its tokens and
    what autograd keeps, about 40 ``D``-sized numbers a layer a token; its prompts are as many
    as ``budget_bytes`` holds (``jobs.attribution.prompts_per_pass`` sizes passes the same way),
    at most a shard's ``batch_size``."""
    L, D = shape.n_layers, shape.d_model
    upstream = graph_nodes(L, shape.n_heads, shape.has_mlp)
    B = min(batch_size, n_prompts)
    per_prompt = seq_len * (upstream + 40 * L) * D * dtype_bytes
    pass_bytes = min(B, max(1, budget_bytes // per_prompt)) * per_prompt
    edges = n_edges(shape)
    # a corrupt forward, then per step a forward and a backward (about two forwards), and every
    # edge's product of a gradient and a change over each token's D numbers
    flops = n_prompts * seq_len * ((1 + 3 * steps) * shape.forward_flops(1, seq_len) + 2.0 * edges * D * steps)
    return Footprint(shape_bytes(shape, dtype_bytes), 0, pass_bytes, per_prompt, flops, -(-n_prompts // B) * steps)


def circuit(
    shape: ModelShape, n_prompts: int, seq_len: int, dtype_bytes: int, circuits: int, tokens_per_pass: int = 1 << 13
) -> Footprint:
    """Circuit evaluation (``circuit_eval.CircuitRunner``): the corrupt run's write of every
    upstream node, in float32, is kept for every prompt (a runner per pass of prompts, kept
    across circuits); a pass (``tokens_per_pass`` over the prompt length and an eighth of the
    upstream nodes, as ``jobs.circuit`` sizes it) holds this run's difference from it and a
    block's activations. One forward per circuit."""
    L, D = shape.n_layers, shape.d_model
    upstream = graph_nodes(L, shape.n_heads, shape.has_mlp)
    kept_per_prompt = upstream * seq_len * D * 4
    per_prompt = kept_per_prompt + seq_len * shape.block_activations() * dtype_bytes
    prompts = min(n_prompts, circuit_prompts_per_pass(tokens_per_pass, seq_len, upstream))
    pass_bytes = prompts * per_prompt
    flops = circuits * (
        shape.forward_flops(n_prompts * seq_len, seq_len) + 2.0 * n_edges(shape) * n_prompts * seq_len * D
    )
    return Footprint(
        shape_bytes(shape, dtype_bytes),
        n_prompts * kept_per_prompt,
        pass_bytes,
        per_prompt,
        flops,
        circuits * -(-n_prompts // prompts),
    )


def circuit_prompts_per_pass(tokens_per_pass: int, seq_len: int, upstream: int) -> int:
    """Prompts a circuit-evaluation pass holds: its upstream outputs ``[U, B, T, D]`` dominate
    its memory, so a pass's tokens over an eighth of the upstream nodes."""
    return max(1, tokens_per_pass // (seq_len * max(1, upstream // 8)))


def shape_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    return shape.parameters * dtype_bytes


def graph_nodes(n_layers: int, n_heads: int, has_mlp: bool) -> int:
    """Upstream nodes of the attribution graph: the embeddings, every head, every MLP."""
    return 1 + n_layers * (n_heads + (1 if has_mlp else 0))


def graph_edges(n_layers: int, n_heads: int, n_kv_heads: int, has_mlp: bool, parallel: bool) -> int:
    """Edges of the attribution graph (``attribution.build_graph``), from its shape alone: each
    head's q, k and v inputs and each MLP read every node written before them (a sequential
    MLP also its own layer's heads), and the final stream reads every node."""
    H, K, L = n_heads, n_kv_heads, n_layers
    mlp = 1 if has_mlp else 0
    stride = H + mlp
    total = 0
    for layer in range(L):
        before = 1 + layer * stride
        total += (H + 2 * K) * before + mlp * (before + (0 if parallel else H))
    return total + graph_nodes(L, H, has_mlp)


def n_edges(shape: ModelShape) -> int:
    return graph_edges(shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.has_mlp, shape.parallel)
