"""Learning-rate schedule: linear warmup, cosine decay to `min_lr_ratio`, then constant."""

import math

from torch.optim.lr_scheduler import LambdaLR


def get_cosine_annealing_schedule_with_warmup(
    optimizer, num_warmup_steps: int, num_decay_steps: int, min_lr_ratio: float = 0.0, last_epoch: int = -1
) -> LambdaLR:
    """Upstream's schedule: LR factor step / warmup, then cosine from 1 to `min_lr_ratio` over the decay steps."""

    def lr_factor(step: int) -> float:
        if step < num_warmup_steps:
            return step / max(1, num_warmup_steps)
        progress = min(1.0, (step - num_warmup_steps) / max(1, num_decay_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, lr_factor, last_epoch)
