"""Early exit: JEI-DNN (Regol, Chataoui and Coates, 2023) and the thresholding baselines.

- :mod:`.distribution`: the exit distribution, oracle exits, gate targets, the test-time rule
- :mod:`.features`: what a gate sees (detached confidence features of its IM)
- :mod:`.heads`: IMs and gates; :mod:`.objective`: the IM and GM losses
- :mod:`.bank`: JEI-DNN members for several cost trade-offs plus a baseline, trained together
- :mod:`.policies`: exit rules at test time; :mod:`.metrics`: accuracy, ECE, conformal sets
- :mod:`.cost`: layers and FLOPs of leaving at each exit
- :mod:`.minilm`: the frozen MiniLM's cached per-layer features (the exit task's data)
- :mod:`.report`: every policy on a test split, tables and plots (`xmoe exit-eval`)

docs/early-exit.md describes the method and the choices made where the paper leaves room.
"""

from .bank import BankConfig, ExitBank, phase_at
from .distribution import exit_distribution, gate_targets, oracle_exit, test_time_exit
from .features import NUM_FEATURES, gate_features
from .heads import ExitHeads, ExitOutput, Gate, InferenceModule
from .objective import exit_losses, gm_loss, im_loss, im_weights, jei_losses

__all__ = [
    "NUM_FEATURES",
    "BankConfig",
    "ExitBank",
    "ExitHeads",
    "ExitOutput",
    "Gate",
    "InferenceModule",
    "exit_distribution",
    "exit_losses",
    "gate_features",
    "gate_targets",
    "gm_loss",
    "im_loss",
    "im_weights",
    "jei_losses",
    "oracle_exit",
    "phase_at",
    "test_time_exit",
]
