"""The maths of `compress share`: which layers share, how a group's shared weights start, the factorised
embedding, and the mapping of a trained BERT's weights onto ALBERT or CompressBert.

Shapes: V vocabulary, P positions, T token types, H hidden, E embedding size, I FFN width, L layers, G groups.
Weights are in BERT's naming on the way in (`bert.encoder.layer.<i>.attention.self.query.weight`; a RoBERTa-family,
ELECTRA, ERNIE, DistilBERT or pruned teacher's are renamed by `bert_named_state`); each converter returns a model
whose function equals the teacher's whenever nothing is actually shared or cut (G = L, no factorisation), which is
what the tests check.
"""

from __future__ import annotations

import torch
from torch import Tensor

from compress.options.bounds import CHOICES

INITS = CHOICES["init"]  # the table --init is checked against, command and search alike
# RegMean's off-diagonal shrink. Measured on the SST-2 MiniLM-L6 teacher (KL to the parent before recovery, summed
# over share all g2/g3, attention g1, ffn g1): 0.25 -> 0.70, 0.5 -> 0.65, 0.9 -> 0.71; 0 and 1 are far worse.
REGMEAN_ALPHA = 0.5

# One BERT encoder layer's sublayers (names after `encoder.layer.<i>.`), split by what --share shares.
ATTENTION = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "attention.output.LayerNorm")
FFN = ("intermediate.dense", "output.dense", "output.LayerNorm")
# The input each Linear reads, keyed by the Linear whose forward pre-hook records it: q, k and v read one input.
LINEAR_INPUT = {
    "attention.self.query": "attention.self.query",
    "attention.self.key": "attention.self.query",
    "attention.self.value": "attention.self.query",
    "attention.output.dense": "attention.output.dense",
    "intermediate.dense": "intermediate.dense",
    "output.dense": "output.dense",
}
# BERT sublayer -> its name inside ALBERT's `albert_layer_groups.<g>.albert_layers.0.`
TO_ALBERT = {
    "attention.self.query": "attention.query",
    "attention.self.key": "attention.key",
    "attention.self.value": "attention.value",
    "attention.output.dense": "attention.dense",
    "attention.output.LayerNorm": "attention.LayerNorm",
    "intermediate.dense": "ffn",
    "output.dense": "ffn_output",
    "output.LayerNorm": "full_layer_layer_norm",
}
_LAYER_PREFIX = "bert.encoder.layer."


# --- which layers share ---------------------------------------------------------------------------------------

def layer_groups(layers: int, groups: int) -> list[int]:
    """The group of each layer: consecutive runs, by ALBERT's own rule so its forward pass agrees.

    AlbertTransformer.forward picks `int(i / (num_hidden_layers / num_hidden_groups))`; the same float
    expression here gives the same answer at every boundary. Every group gets at least one layer when
    1 <= groups <= layers, and sizes differ by at most one: layer_groups(6, 4) == [0, 0, 1, 2, 2, 3].
    """
    if not 1 <= groups <= layers:
        raise ValueError(f"groups must be between 1 and {layers}, got {groups}")
    step = layers / groups
    return [int(i / step) for i in range(layers)]


# --- how a group's shared weights start ----------------------------------------------------------------------

def bert_layers(state: dict[str, Tensor], layers: int) -> list[dict[str, Tensor]]:
    """Split a BERT classifier's state dict into one dict per encoder layer, keyed `<sublayer>.<weight|bias>`."""
    out: list[dict[str, Tensor]] = [{} for _ in range(layers)]
    for key, value in state.items():
        if key.startswith(_LAYER_PREFIX):
            index, rest = key[len(_LAYER_PREFIX):].split(".", 1)
            out[int(index)][rest] = value
    return out


# The dimension of each BERT sublayer weight that pruning cuts: heads (q, k, v rows; the attention output's
# columns) and FFN neurons (the intermediate's rows; the output's columns). LayerNorms are never cut.
_CUT_DIM = {"attention.self.query": 0, "attention.self.key": 0, "attention.self.value": 0,
            "attention.output.dense": 1, "intermediate.dense": 0, "output.dense": 1}


def pad_layers(layers: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """The layers of a pruned model grown with zero heads and zero FFN neurons to the largest of them, so a group of
    them can share one module. A zero head (its q, k, v rows and output columns 0) or neuron (its input row, bias
    and output column 0) adds exactly nothing: each padded layer computes what it did."""
    out = [dict(layer) for layer in layers]
    for key in layers[0]:
        sub, kind = key.rsplit(".", 1)
        dim = _CUT_DIM.get(sub)
        if dim is None or (kind == "bias" and dim == 1):  # an output bias is H wide, never cut
            continue
        size = max(layer[key].shape[dim] for layer in layers)
        for layer in out:
            t = layer[key]
            if t.shape[dim] < size:
                shape = list(t.shape)
                shape[dim] = size - t.shape[dim]
                layer[key] = torch.cat([t, t.new_zeros(shape)], dim=dim)
    return out


def pad_gram(gram: Tensor, size: int) -> Tensor:
    """(n + 1, n + 1) [X 1]^T [X 1] -> (size + 1, size + 1): the padded inputs are always 0, the bias stays last."""
    n = gram.shape[0] - 1
    out = gram.new_zeros(size + 1, size + 1)
    out[:n, :n], out[:n, -1], out[-1, :n], out[-1, -1] = gram[:n, :n], gram[:n, -1], gram[-1, :n], gram[-1, -1]
    return out


def regmean(weights: list[Tensor], biases: list[Tensor], grams: list[Tensor],
            alpha: float = REGMEAN_ALPHA) -> tuple[Tensor, Tensor]:
    """One Linear that best reproduces several, each on its own inputs (RegMean, Jin et al. 2023).

    Minimises sum_l ||X_l W^T + b - (X_l W_l^T + b_l)||^2 over W, b, where X_l are the inputs layer l's Linear
    saw on calibration data. With G_l = [X_l 1]^T [X_l 1] the solution is
    [W^T; b] = (sum_l G_l)^-1 sum_l G_l [W_l^T; b_l]. Plain averaging is the special case of equal, white
    inputs; RegMean instead weights each layer's weights by the directions its inputs actually take.
    `alpha` < 1 shrinks the Grams' off-diagonal terms toward their diagonal, as the paper does, so that
    directions seen rarely in a small calibration set do not dominate (alpha = 1 is the exact least-squares
    solution for the calibration tokens, and generalises worst; see REGMEAN_ALPHA).

    weights[l]: (out, in); biases[l]: (out,); grams[l]: (in + 1, in + 1), the last row/column for the bias.
    """
    total_g, total_gw = 0.0, 0.0
    for w, b, g in zip(weights, biases, grams, strict=True):
        g = g.double()
        g = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
        wb = torch.cat([w.T, b[None]], dim=0).double()  # (in + 1, out)
        total_g, total_gw = total_g + g, total_gw + g @ wb
    if not torch.diagonal(total_g).any():  # no layer saw any input (all its heads pruned): nothing to weigh by
        return torch.stack(weights).mean(dim=0), torch.stack(biases).mean(dim=0)
    # a whisper of ridge keeps the solve defined if an input direction was never seen
    ridge = 1e-8 * torch.diagonal(total_g).mean() * torch.eye(total_g.shape[0], dtype=total_g.dtype)
    solution = torch.linalg.solve(total_g + ridge, total_gw)  # (in + 1, out)
    return solution[:-1].T.to(weights[0].dtype).contiguous(), solution[-1].to(biases[0].dtype)


def merge_layers(layers: list[dict[str, Tensor]], init: str, grams: list[dict[str, Tensor]] | None = None,
                 alpha: float = REGMEAN_ALPHA) -> dict[str, Tensor]:
    """The starting weights of one shared module from the layers it replaces (same keys as each layer's dict).

    init: 'first' copies the group's first layer; 'mean' averages every weight; 'regmean' solves each Linear
    by `regmean` from the group's input Grams (`grams[l]` keyed by LINEAR_INPUT's values) and averages the
    LayerNorms.
    """
    keys = list(layers[0])
    if init == "first" or len(layers) == 1:  # a group of one layer is that layer, whatever the init
        return {k: layers[0][k].clone() for k in keys}
    merged = {k: torch.stack([layer[k] for layer in layers]).mean(dim=0) for k in keys}
    if init == "mean":
        return merged
    if init != "regmean":
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if grams is None:
        raise ValueError("init 'regmean' needs the input Grams of every layer")
    for linear, source in LINEAR_INPUT.items():
        if f"{linear}.weight" not in layers[0]:
            continue  # this module shares only the other sublayer kind
        w, b = regmean([layer[f"{linear}.weight"] for layer in layers], [layer[f"{linear}.bias"] for layer in layers],
                       [g[source] for g in grams], alpha)
        merged[f"{linear}.weight"], merged[f"{linear}.bias"] = w, b
    return merged


@torch.no_grad()
def input_grams(model, batches) -> list[dict[str, Tensor]]:
    """For each encoder layer of a BERT `model`, [X 1]^T [X 1] of each Linear's input over real (unpadded) tokens.

    Keyed by LINEAR_INPUT's values. Accumulated in float64: a few hundred sentences give tens of thousands of
    tokens, and the Gram is summed over all of them.
    """
    linears = _layer_linears(model)
    grams: list[dict[str, Tensor]] = [{} for _ in linears]
    current: dict[str, Tensor] = {}

    def recorder(index: int, name: str):
        def hook(module, args):
            x = args[0][current["mask"]].double()  # (tokens, in): padding rows dropped
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
            grams[index][name] = grams[index].get(name, 0) + (x.T @ x).cpu()
        return hook

    handles = [linear.register_forward_pre_hook(recorder(i, name))
               for i, layer in enumerate(linears) for name, linear in layer.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            current["mask"] = batch["attention_mask"].bool()
            model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    # A pruned attention module left with no heads never calls its Linears: a zero Gram leaves that layer out of
    # the solve for them, which is right, as all its padded weights are zero.
    for layer, found in zip(linears, grams):
        for name, linear in layer.items():
            found.setdefault(name, torch.zeros(linear.in_features + 1, linear.in_features + 1, dtype=torch.float64))
    return grams


def _layer_linears(model) -> list[dict]:
    """Per encoder layer, the Linear reading each of LINEAR_INPUT's inputs, under whatever name `model` gives it."""
    from compress.models.compress_bert.convert import layer_modules

    return [{name: model.get_submodule(paths[name]) for name in set(LINEAR_INPUT.values())}
            for paths in layer_modules(model)]


# --- the factorised embedding ---------------------------------------------------------------------------------

def relative_error(matrix: Tensor, approx: Tensor) -> float:
    """||matrix - approx||_F / ||matrix||_F."""
    matrix = matrix.double()
    return float(torch.linalg.matrix_norm(matrix - approx.double()) / torch.linalg.matrix_norm(matrix))


def truncated_svd(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """matrix (V, H) ~ A (V, rank) @ B (rank, H): the best rank-`rank` approximation in Frobenius norm.

    A = U_r S_r, B = V_r^T (B has orthonormal rows). Returns A, B (float64) and the relative Frobenius error,
    which is 0 up to float error whenever rank >= the matrix's rank (Eckart-Young).
    """
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    a, b = u[:, :rank] * s[:rank], vh[:rank]
    if rank > len(s):  # more factors than the matrix has (a vocabulary smaller than E): zero-pad them
        a = torch.nn.functional.pad(a, (0, rank - len(s)))
        b = torch.nn.functional.pad(b, (0, 0, 0, rank - len(s)))
    return a, b, relative_error(matrix, a @ b)


def centre_rows(matrix: Tensor) -> Tensor:
    """Each row minus its own mean over H.

    BERT adds word, position and type embeddings and then applies LayerNorm, which subtracts the sum's mean
    over H; the mean of a sum is the sum of the means, so centring each table first leaves the embedding
    output unchanged exactly, and frees the factorisation from spending a dimension on the mean.
    """
    matrix = matrix.double()
    return matrix - matrix.mean(dim=1, keepdim=True)


def factorise_word_embedding(word: Tensor, embedding_size: int) -> tuple[Tensor, Tensor, float]:
    """CompressBert's factorised word embedding: centred (V, H) ~ (V, E) @ (E, H); returns both and svd_error.

    svd_error is relative to the centred table (the part LayerNorm does not discard).
    """
    return truncated_svd(centre_rows(word), embedding_size)


def _orthonormal_complement_of_ones(size: int) -> Tensor:
    """Q (size - 1, size) with orthonormal rows, every row orthogonal to the all-ones vector."""
    eye = torch.eye(size, dtype=torch.float64)
    basis = torch.cat([torch.ones(size, 1, dtype=torch.float64), eye[:, : size - 1]], dim=1)
    q, _ = torch.linalg.qr(basis)  # first column spans the ones vector, the rest its complement
    return q[:, 1:].T.contiguous()


def albert_embeddings(word: Tensor, position: Tensor, token_type: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                      embedding_size: int, basis: str = "balanced") -> tuple[dict[str, Tensor], float]:
    """ALBERT's embedding tensors (E-wide tables, E-wide LayerNorm, E -> H mapping) equal in function to BERT's.

    BERT:   out = LN_H(w + p + t)                         (gamma g, beta beta, over H)
    ALBERT: out = M(LN_E(w' + p' + t')) + c               (its own E-wide LN, then embedding_hidden_mapping_in)

    E = H: the tables and LayerNorm are BERT's and M is the identity: exactly BERT.
    E < H: the centred tables (see `centre_rows`) are projected onto an (E - 1)-dimensional basis B
    ((E - 1, H), orthonormal rows), written in E coordinates that all sum to zero (Q, (E - 1, E)). ALBERT's
    LN_E then subtracts nothing and divides by ||z|| / sqrt(E), where BERT's would divide by ||x|| / sqrt(H)
    and ||z|| = ||x||; so with gamma_E = 1, beta_E = 0, M = sqrt(H / E) Q^T B diag(g) and c = beta, ALBERT
    computes exactly BERT's LN_H(x) for every x in span(B), and its orthogonal projection otherwise. The one
    coordinate that LN_E's centring would destroy is the one left unused, hence E - 1.

    basis: 'word' takes B from the word table's SVD alone; 'balanced' from the three centred tables stacked,
    each divided by sqrt(its rows), i.e. it minimises the expected error of w + p + t for a word, position
    and type drawn uniformly, so 512 positions are not drowned by 30k words.

    Returns the tensors (keys relative to `albert.`) and svd_error: the relative Frobenius error of the
    centred word table under B.
    """
    h = word.shape[1]
    dtype = word.dtype
    if embedding_size == h:
        state = {
            "embeddings.word_embeddings.weight": word.clone(),
            "embeddings.position_embeddings.weight": position.clone(),
            "embeddings.token_type_embeddings.weight": token_type.clone(),
            "embeddings.LayerNorm.weight": norm_weight.clone(),
            "embeddings.LayerNorm.bias": norm_bias.clone(),
            "encoder.embedding_hidden_mapping_in.weight": torch.eye(h, dtype=dtype),
            "encoder.embedding_hidden_mapping_in.bias": torch.zeros(h, dtype=dtype),
        }
        return state, 0.0
    if not 2 <= embedding_size < h:
        raise ValueError(f"embedding_size must be between 2 and {h}, got {embedding_size}")
    tables = [centre_rows(t) for t in (word, position, token_type)]
    rank = embedding_size - 1
    if basis == "word":
        _, b, _ = truncated_svd(tables[0], rank)
    elif basis == "balanced":
        stacked = torch.cat([t / len(t) ** 0.5 for t in tables])
        _, b, _ = truncated_svd(stacked, rank)
    else:
        raise ValueError(f"unknown basis {basis!r}")
    q = _orthonormal_complement_of_ones(embedding_size)  # (E - 1, E)
    to_e = b.T @ q  # (H, E): centred H-space row -> E coordinates summing to zero
    mapping = (h / embedding_size) ** 0.5 * (q.T @ b) * norm_weight.double()[None, :]  # (E, H)
    word_e, position_e, type_e = (t @ to_e for t in tables)
    state = {
        "embeddings.word_embeddings.weight": word_e.to(dtype),
        "embeddings.position_embeddings.weight": position_e.to(dtype),
        "embeddings.token_type_embeddings.weight": type_e.to(dtype),
        "embeddings.LayerNorm.weight": torch.ones(embedding_size, dtype=dtype),
        "embeddings.LayerNorm.bias": torch.zeros(embedding_size, dtype=dtype),
        "encoder.embedding_hidden_mapping_in.weight": mapping.T.to(dtype).contiguous(),  # nn.Linear: (out H, in E)
        "encoder.embedding_hidden_mapping_in.bias": norm_bias.clone(),
    }
    return state, relative_error(tables[0], tables[0] @ b.T @ b)


# --- whole models ---------------------------------------------------------------------------------------------

def _group_modules(state: dict[str, Tensor], groups: list[int], init: str, kinds: tuple[str, ...], grams,
                   alpha: float):
    """Merged BERT-named sublayer weights per group, for the sublayers in `kinds`, from a BERT-named `state`."""
    per_layer = bert_layers(state, len(groups))
    keep = lambda layer: {k: v for k, v in layer.items() if k.rsplit(".", 1)[0] in kinds}
    merged = []
    for g in range(max(groups) + 1):
        members = [i for i, gi in enumerate(groups) if gi == g]
        layers = pad_layers([keep(per_layer[i]) for i in members])  # a pruned model's layers may differ in size
        group_grams = None
        if grams is not None:
            group_grams = [{name: pad_gram(gram, layers[0][f"{name}.weight"].shape[1]) if f"{name}.weight" in layers[0]
                            else gram for name, gram in grams[i].items()} for i in members]
        merged.append(merge_layers(layers, init, group_grams, alpha))
    return merged


def _load(model, state: dict[str, Tensor]):
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    return model


def to_albert(teacher, groups: int, embedding_size: int | None = None, init: str = "mean", grams=None,
              alpha: float = REGMEAN_ALPHA, basis: str = "balanced"):
    """An AlbertForSequenceClassification from a BERT, ERNIE or RoBERTa-family classifier (not one whose head is not
    tanh, HEAD_ACT): --share all.

    G groups of consecutive layers (ALBERT's rule), each one shared layer started by `init`; embedding_size
    None keeps BERT's H-wide embeddings (identity mapping). Returns (model, svd_error).

    ALBERT numbers positions from 0, RoBERTa from its pad id + 1, so a RoBERTa's position table loses its first
    pad + 1 rows: every real token keeps its position vector, as compress pads on the right. Padding tokens get
    other positions than in RoBERTa, which changes nothing that is not masked.
    """
    from transformers import AlbertConfig, AlbertForSequenceClassification

    from compress.models.compress_bert.convert import HEAD_ACT, ROBERTA_TYPES, bert_named_state

    c = teacher.config
    if c.model_type in HEAD_ACT:  # ALBERT's pooler is tanh; these heads have another activation in its place
        raise ValueError(f"a {c.model_type} cannot become an ALBERT: ALBERT's head is tanh where its is "
                         f"{HEAD_ACT[c.model_type]}")
    if c.model_type == "compress_bert":  # per-layer sizes; ALBERT has one size (to_compress_shared shares "all")
        raise ValueError("a CompressBert cannot become an ALBERT; share it with to_compress_shared")
    e = embedding_size or c.hidden_size
    state_in = bert_named_state(teacher)
    position = state_in["bert.embeddings.position_embeddings.weight"]  # (P, H)
    if c.model_type in ROBERTA_TYPES:
        position = position[c.pad_token_id + 1:]
    config = AlbertConfig(
        vocab_size=c.vocab_size, embedding_size=e, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_hidden_groups=groups, inner_group_num=1, num_attention_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size, hidden_act=c.hidden_act,  # ALBERT's default is gelu_new, not BERT's
        hidden_dropout_prob=c.hidden_dropout_prob, attention_probs_dropout_prob=c.attention_probs_dropout_prob,
        max_position_embeddings=len(position), type_vocab_size=c.type_vocab_size,
        initializer_range=c.initializer_range, layer_norm_eps=c.layer_norm_eps,
        classifier_dropout_prob=c.classifier_dropout if c.classifier_dropout is not None else c.hidden_dropout_prob,
        pad_token_id=c.pad_token_id, bos_token_id=getattr(c, "bos_token_id", None),
        eos_token_id=getattr(c, "eos_token_id", None), num_labels=c.num_labels, id2label=dict(c.id2label),
        label2id=dict(c.label2id), problem_type=c.problem_type,
    )
    config._attn_implementation = c._attn_implementation or "sdpa"
    embeddings, svd_error = albert_embeddings(
        state_in["bert.embeddings.word_embeddings.weight"], position,
        state_in["bert.embeddings.token_type_embeddings.weight"], state_in["bert.embeddings.LayerNorm.weight"],
        state_in["bert.embeddings.LayerNorm.bias"], e, basis)
    state = {f"albert.{k}": v for k, v in embeddings.items()}
    merged = _group_modules(state_in, layer_groups(c.num_hidden_layers, groups), init, ATTENTION + FFN, grams, alpha)
    for g, module in enumerate(merged):
        for key, value in module.items():
            sub, kind = key.rsplit(".", 1)
            state[f"albert.encoder.albert_layer_groups.{g}.albert_layers.0.{TO_ALBERT[sub]}.{kind}"] = value
    state |= {"albert.pooler.weight": state_in["bert.pooler.dense.weight"],
              "albert.pooler.bias": state_in["bert.pooler.dense.bias"],
              "classifier.weight": state_in["classifier.weight"], "classifier.bias": state_in["classifier.bias"]}
    model = AlbertForSequenceClassification(config)
    return _load(model, {k: v.clone() for k, v in state.items()}), svd_error


def to_compress_shared(teacher, share: str, groups: int, embedding_size: int | None = None, init: str = "mean",
                       grams=None, alpha: float = REGMEAN_ALPHA):
    """A CompressBertForSequenceClassification sharing attention modules, FFN modules or both ("all") across layer
    groups.

    The teacher may be a pruned CompressBert whose layers differ in size: each group's layers are padded with zero
    heads and neurons to the largest of them (pad_layers), so the shared module is that large.
    A sublayer kind not shared keeps one module per layer, with the teacher's weights. embedding_size factorises
    the word embedding (CompressBertConfig.embedding_size; not for an ELECTRA whose embeddings are already narrower
    than its hidden size: CompressBertConfig refuses both). Returns (model, svd_error).
    """
    from compress.models.compress_bert import CompressBertForSequenceClassification
    from compress.models.compress_bert.convert import bert_named_state, rename_key, to_compress_config

    c = teacher.config
    group_of = layer_groups(c.num_hidden_layers, groups)
    kinds = {"attention": ATTENTION, "ffn": FFN, "all": ATTENTION + FFN}[share]
    state_in = bert_named_state(teacher)
    merged = _group_modules(state_in, group_of, init, kinds, grams, alpha)
    changes = {}
    if share in ("attention", "all"):
        head_size = getattr(c, "attention_head_size", None) or c.hidden_size // c.num_attention_heads
        changes |= {"attention_map": group_of,
                    "attention_heads": [m["attention.self.query.weight"].shape[0] // head_size for m in merged]}
    if share in ("ffn", "all"):
        changes |= {"ffn_map": group_of,
                    "intermediate_sizes": [m["intermediate.dense.weight"].shape[0] for m in merged]}
    config = to_compress_config(c, **changes, embedding_size=embedding_size)
    config._attn_implementation = c._attn_implementation or "sdpa"

    state = {}
    for key, value in state_in.items():
        if not key.startswith(_LAYER_PREFIX):
            state[key] = value.clone()
        elif key[len(_LAYER_PREFIX):].split(".", 1)[1].rsplit(".", 1)[0] not in kinds:  # a sublayer kept per layer
            state[rename_key(key)] = value.clone()
    for g, module in enumerate(merged):
        for key, value in module.items():
            state[rename_key(f"{_LAYER_PREFIX}{g}.{key}")] = value
    svd_error = 0.0
    if embedding_size is not None:
        word = state.pop("bert.embeddings.word_embeddings.weight")
        a, b, svd_error = factorise_word_embedding(word, embedding_size)
        state["bert.embeddings.word_embeddings.embed.weight"] = a.to(word.dtype)
        state["bert.embeddings.word_embeddings.project.weight"] = b.T.to(word.dtype).contiguous()  # (H, E)
    model = CompressBertForSequenceClassification(config)
    return _load(model, state), svd_error


# --- parameter counts, written out so tests can check the models against them ---------------------------------

def albert_param_count(*, vocab: int, positions: int, types: int, hidden: int, intermediate: int, groups: int,
                       embedding: int, labels: int) -> int:
    """(V + P + T) E + 2E [LN_E] + E H + H [mapping] + G x layer + H^2 + H [pooler] + H C + C [classifier], where
    layer = 4 (H^2 + H) [q, k, v, attention output] + 2H [its LN] + H I + I + I H + H [FFN] + 2H [its LN]."""
    v, p, t, h, i, e, c = vocab, positions, types, hidden, intermediate, embedding, labels
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    return (v + p + t) * e + 2 * e + (e * h + h) + groups * layer + (h * h + h) + (h * c + c)


def compress_shared_param_count(*, vocab: int, positions: int, types: int, hidden: int, intermediate: int,
                                layers: int, attention_modules: int, ffn_modules: int, embedding: int | None,
                                labels: int) -> int:
    """Word table V H, or V E + E H factorised (no bias); (P + T) H + 2H [positions, types, LN];
    attention module 4 (H^2 + H) + 2H; FFN module H I + I + I H + H + 2H; pooler H^2 + H; classifier H C + C."""
    v, p, t, h, i, c = vocab, positions, types, hidden, intermediate, labels
    word = v * h if embedding is None else v * embedding + embedding * h
    attention = 4 * (h * h + h) + 2 * h
    ffn = (h * i + i) + (i * h + h) + 2 * h
    return word + (p + t) * h + 2 * h + attention_modules * attention + ffn_modules * ffn + (h * h + h) + (h * c + c)
