"""Shared fixtures: tiny models and files built in the test's own folder (no downloads)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _own_stage_cache(tmp_path, monkeypatch):
    """Each test (and the commands it starts) gets an empty stage cache of its own: no test passes on another's
    results, and nothing is written to the user's ~/.cache."""
    monkeypatch.setenv("EDGE_COMPRESS_CACHE", str(tmp_path / ".stage-cache"))


@pytest.fixture()
def model_file(tmp_path):
    """A user model file with a factory, importing a sibling helper module as users' projects do."""
    (tmp_path / "helpers.py").write_text("WIDTH = 6\n")
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\nfrom helpers import WIDTH\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, WIDTH, 3, padding=1)\n"
        "        self.fc = nn.Linear(WIDTH, 4)\n"
        "    def forward(self, pixels):\n"
        "        return self.fc(self.conv(pixels).relu().mean((2, 3)))\n\n"
        "def build():\n    torch.manual_seed(0)\n    return Net()\n\n"
        "def not_a_model():\n    return 42\n\n"
        "def broken():\n    raise ValueError('no such checkpoint')\n"
    )
    return tmp_path / "net.py"


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory):
    """A tiny BERT saved as a Hugging Face folder (config.json + model.safetensors)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("bert")
    cfg = transformers.BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    import torch

    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


ENCODER_SEQ = 16  # the sequence length `encoder` is exported at


@pytest.fixture(scope="session")
def encoder(tmp_path_factory):
    """compress.zoo's encoder_tiny as ONNX (input_ids and attention_mask, 1 x ENCODER_SEQ): the INT8 tests'
    transformer, dynamically quantized."""
    import torch

    from compress.zoo import encoder_tiny
    from export import export_onnx

    path = tmp_path_factory.mktemp("enc") / "encoder_tiny.onnx"
    ids = torch.randint(1, 1000, (1, ENCODER_SEQ), generator=torch.Generator().manual_seed(0))
    export_onnx(encoder_tiny(), {"input_ids": ids, "attention_mask": torch.ones(1, ENCODER_SEQ, dtype=torch.int64)},
                path)
    return path


def _matmul_onnx(path, rows: int = 4, width: int = 64):
    """One MatMul (rows x width @ width x width, seeded weights) saved at `path`: an ONNX model for the commands
    that take one (profile, compare, the API), about 1 ms at 64 x 512."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((width, width)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, width])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="session")
def matmul_onnx():
    """_matmul_onnx(path, rows=4, width=64) -> path."""
    return _matmul_onnx
