"""Random-rotation baseline (the paper's Sec. 3.4, Fig. 7): ablating random directions instead of units.

Why: if units were no more meaningful than any other basis of the layer's channel space, ablating a random direction
would hurt single classes as much as ablating a unit does. At a layer with C channels a random orthogonal matrix Q
(Haar-distributed, ``scipy.stats.ortho_group``, seeded) gives C directions q_j. Ablating direction j expresses the
activation at every position in the rotated basis z = Q^T a, zeroes coordinate j and rotates back: a' = Q z, which is
a' = a - q_j (q_j^T a). The tail of the network then runs on a' exactly as for a unit ablation, so the class drop
vector and the overall drop of every direction are comparable with the units' (``compute.stages.ablation``). With
Q = identity the directions are the units themselves.

Store: ``layers/<L>/rotation/class_drop`` [R, C, K], ``overall_drop`` [R, C] and ``seeds`` [R] for R rotations
(``--rotations R``; seeds 0..R-1), with the paired counts and tests of ``compute.stages.ablation`` (``lost``, ``gained``,
``p_value``, ``q_value`` [R, C, K]; q-values corrected over each rotation's C x K tests, as a layer's units are). Under torchrun the directions are shared out between the ranks (every rank does
its directions of every rotation); correct counts are whole numbers, so the combined drops are the one-process ones.
"""

from __future__ import annotations

import torch
from scipy.stats import ortho_group



def random_rotation(channels: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal [C, C] matrix, the same for the same (channels, seed); its columns are directions."""
    return torch.from_numpy(ortho_group.rvs(channels, random_state=seed)).float()
