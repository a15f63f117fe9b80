"""Drop-in torch.optim optimizers with fused multi-tensor steps (same math, arguments,
param groups and state_dict layout as torch's: checkpoints move between the two)."""
from .adam import Adam, AdamW
from .adam8bit import AdamW8bit
from .clip import clip_grad_norm_
from .sgd import SGD

__all__ = ["Adam", "AdamW", "AdamW8bit", "SGD", "clip_grad_norm_"]
