"""Run TRL 1.16's own GKD loss on saved tensors (inside TRL's venv, not ours).

``python trl_gkd_loss.py IN.pt OUT.pt``: ``IN.pt`` holds a list of cases, each with ``student`` and ``teacher``
logits (``[B, T, V]``, fp64), ``labels`` (``[B, T]``, -100 where no loss), ``beta`` and ``temperature``.
``GKDTrainer.generalized_jsd_loss`` itself (a static method) runs on each with ``reduction="batchmean"``; the losses
and TRL's version are written to ``OUT.pt``.
"""

from __future__ import annotations

import os
import sys

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def main(inp: str, out: str) -> None:
    import trl
    from trl.experimental.gkd import GKDTrainer

    cases = torch.load(inp)
    losses = [float(GKDTrainer.generalized_jsd_loss(c["student"], c["teacher"], labels=c["labels"], beta=c["beta"],
                                                    temperature=c["temperature"], reduction="batchmean"))
              for c in cases]
    torch.save({"losses": losses, "trl_version": trl.__version__}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
