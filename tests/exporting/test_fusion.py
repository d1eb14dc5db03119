"""onnxruntime's transformer fusions on tiny models: every attention layer fuses, a pruned model's with its own head
count, logits match PyTorch on new shapes and on every padding layout, and each way fusion fails is refused in one
line without a graph left behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import one_torch_thread

from compress.exporting.fusion import check_fuse, fused_onnx
from compress.exporting.onnx import PARITY_TOL, load_for_export, onnx_session, quantize_int8, random_inputs
from compress.infra.errors import CompressError

pytestmark = pytest.mark.filterwarnings("ignore")

NAMES = ["input_ids", "attention_mask", "token_type_ids"]


one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_teacher) -> Path:
    """The tiny teacher as compress's own class with 4, 1, 3 and 0 heads kept (head width 8, so 24 is not the
    hidden 32) and uneven FFN widths, as compress prune leaves it."""
    from transformers import AutoModelForSequenceClassification

    from compress.models.compress_bert import from_bert
    from compress.pruning.slicing import slice_heads, slice_neurons

    model = from_bert(AutoModelForSequenceClassification.from_pretrained(tiny_teacher).eval())
    slice_neurons(slice_heads(model, [[0, 1, 2, 3], [2], [0, 2, 3], []]), [list(range(64)), list(range(16)),
                                                                          list(range(40)), list(range(8))])
    with torch.no_grad():  # a random init's logits are ~1e-3; scaled, a wrong graph cannot hide under the tolerance
        model.classifier.weight.mul_(100)
    model.config.architectures = [type(model).__name__]
    folder = tmp_path_factory.mktemp("pruned") / "pruned"
    model.save_pretrained(folder)
    for f in tiny_teacher.glob("tokenizer*"):
        shutil.copy(f, folder)
    return folder


def ops(path: Path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path)).graph.node)


def max_diff(model, path: Path, inputs: dict) -> float:
    with torch.no_grad():
        expected = model(**inputs).logits.numpy()
    got = onnx_session(path).run(["logits"], {n: t.numpy() for n, t in inputs.items()})[0]
    return float(np.abs(got - expected).max())


def left_padded(batch: int, seq: int, seed: int) -> dict:
    inputs = random_inputs(NAMES, batch, seq, 27, seed=seed, type_vocab=2)
    inputs["attention_mask"][:] = 1
    for row in range(batch):
        inputs["attention_mask"][row, :row * 3] = 0  # row 0 unpadded, the others padded on the left
    return inputs


def test_bert_fuses_every_layer_and_matches_pytorch(tmp_path, tiny_teacher) -> None:
    model, tokenizer = load_for_export(str(tiny_teacher))
    fused = fused_onnx(model, tokenizer, tmp_path / "model.onnx", tmp_path / "work")
    assert fused.ops == {"EmbedLayerNormalization": 1, "Attention": 4, "BiasGelu": 4, "SkipLayerNormalization": 8}
    assert list(fused.diffs) == ["3x29", "1x7", "4x23 masks"] and max(fused.diffs.values()) <= PARITY_TOL
    assert model.config._attn_implementation == "sdpa"  # eager only while tracing; the caller's model is unchanged
    assert max_diff(model, tmp_path / "model.onnx", left_padded(5, 40, seed=1)) <= PARITY_TOL
    inputs = {i.name: i for i in onnx.load(str(tmp_path / "model.onnx")).graph.input}
    assert all(d.dim_param for i in inputs.values() for d in i.type.tensor_type.shape.dim)  # batch, sequence dynamic


def test_pruned_compress_bert_fuses_each_layer_with_its_own_head_count(tmp_path, pruned) -> None:
    model, tokenizer = load_for_export(str(pruned))
    assert model.config.attention_heads == [4, 1, 3, 0]
    fused = fused_onnx(model, tokenizer, tmp_path / "model.onnx", tmp_path / "work")
    assert fused.ops["Attention"] == 3  # the layer with no heads is a bias: nothing to fuse
    heads = [a.i for n in ops(tmp_path / "model.onnx") if n.op_type == "Attention" for a in n.attribute
             if a.name == "num_heads"]
    assert heads == [4, 1, 3]
    assert max(fused.diffs.values()) <= PARITY_TOL
    assert max_diff(model, tmp_path / "model.onnx", left_padded(4, 33, seed=2)) <= PARITY_TOL


def test_int8_of_the_fused_graph_keeps_its_fusions_and_stays_close(tmp_path, tiny_teacher) -> None:
    model, tokenizer = load_for_export(str(tiny_teacher))
    fused_onnx(model, tokenizer, tmp_path / "model.onnx", tmp_path / "work")
    quantize_int8(tmp_path / "model.onnx", tmp_path / "model.int8.onnx")  # raised before DefaultTensorType was given
    kinds = {n.op_type for n in ops(tmp_path / "model.int8.onnx")}
    assert {"QAttention", "QEmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu"} <= kinds
    assert max_diff(model, tmp_path / "model.int8.onnx", left_padded(3, 21, seed=3)) < 0.05


def test_the_default_mask_format_is_caught_by_the_masks_shape(tmp_path, tiny_teacher, monkeypatch) -> None:
    """onnxruntime's BERT default reads the mask as one length per row; parity's left-padded and holed rows must
    refuse it, though every right-padded shape would pass."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    monkeypatch.setattr(FusionOptions, "use_raw_attention_mask", lambda self, use_raw_mask=True: None)
    model, tokenizer = load_for_export(str(tiny_teacher))
    with torch.no_grad():  # logits big enough that a wrong mask shows above the tolerance
        model.classifier.weight.mul_(100)
    with pytest.raises(CompressError, match=r"differs from PyTorch .* 4x23 masks: [0-9.e-]+$") as info:
        fused_onnx(model, tokenizer, tmp_path / "model.onnx", tmp_path / "work")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("case", ["nothing-fused", "optimizer-raises"])
def test_refusals_are_one_line_and_leave_no_graph(case, tmp_path, tiny_teacher, monkeypatch) -> None:
    from compress.exporting import fusion

    def no_attention(src, dst, config):
        shutil.copy(src, dst)
        return {"SkipLayerNormalization": 8}

    def raises(src, dst, config):
        raise RuntimeError("pattern walk failed\nwith a traceback's worth of detail")

    monkeypatch.setattr(fusion, "_fuse", {"nothing-fused": no_attention, "optimizer-raises": raises}[case])
    model, tokenizer = load_for_export(str(tiny_teacher))
    with pytest.raises(CompressError) as info:
        fused_onnx(model, tokenizer, tmp_path / "model.onnx", tmp_path / "work")
    expected = {"nothing-fused": "no attention layer fused (fused: SkipLayerNormalization x8)",
                "optimizer-raises": "the fusion export failed for BertForSequenceClassification: pattern walk failed"}
    assert str(info.value) == expected[case]
    assert not (tmp_path / "model.onnx").exists()


def test_check_fuse() -> None:
    assert [check_fuse(m) for m in ("auto", "on", "off")] == ["auto", "on", "off"]
    with pytest.raises(CompressError, match=r"^--fuse yes: use auto, on or off$"):
        check_fuse("yes")
