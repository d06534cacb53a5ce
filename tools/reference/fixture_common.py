"""What the fixture scripts of peft/tests/fixtures share: the folder, the two-row batch (the second
row left-padded), loading a committed tiny model, peft's parameter line and eval logits."""
import contextlib
import io
import os

import torch
from transformers import AutoModelForCausalLM

ROOT = os.path.join("peft", "tests", "fixtures")
IDS = torch.tensor([[1, 17, 45, 99, 3, 64, 127, 8], [1, 5, 9, 2, 120, 33, 7, 61]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]])


def base(model):
    """The committed causal LM models/<model>, in eval mode."""
    return AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, "models", model)).eval()


def param_line(model):
    """peft's print_trainable_parameters line."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    return buf.getvalue().strip()


def logits(model):
    """Logits of the batch (IDS, MASK), f32, without gradients."""
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits.float().contiguous()
