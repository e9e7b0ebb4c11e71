"""What live work in the app needs, kept in the store: a layer's activations and the weights of the network after it.

With these the app reruns any ablation of that layer (greedy for a class, a hand-picked set) on a machine that has
neither the validation images nor the checkpoint. Weights are stored as plain arrays (never pickles); the tail is
rebuilt from the model registry and loaded from them.
"""

from __future__ import annotations

import numpy as np
import torch

from compute.lib.sequence import tail_of
from store.writer import create_array, write_array
from store.schema import layer_path


def run_stage(ctx, layer: str) -> None:
    step = ctx.step(layer)
    tail = tail_of(ctx.sequence, step)
    with ctx.writer.stage(f"live/{layer}") as h5:
        group = layer_path(layer, "live")
        first = True
        for acts, _, idx in ctx.activations([layer], desc=f"keeping {layer} activations for live work"):
            a = acts[layer].cpu().numpy()
            if first:
                # One image per chunk: a live greedy run on a layer too big to hold reads one class's images,
                # scattered over the validation set (173 KB per chunk for AlexNet conv5).
                data = create_array(h5, f"{group}/acts", (len(ctx.images),) + a.shape[1:], np.float32,
                                    chunks=(1,) + a.shape[1:])
                first = False
            data[idx.numpy().min(): idx.numpy().max() + 1] = a
        for name, tensor in tail.state_dict().items():
            write_array(h5, f"{group}/tail/{name}", tensor.detach().cpu().numpy())
        h5[group].attrs["step"] = step
        h5[group].attrs["model"] = ctx.spec.name
        h5[group].attrs["num_classes"] = ctx.num_classes


def load_tail(spec, num_classes: int, layer: str, state: dict[str, np.ndarray]) -> torch.nn.Sequential:
    """Rebuild the tail after ``layer`` from the registry's architecture and stored arrays."""
    model = spec.build(num_classes)
    tail = tail_of(spec.to_sequence(model), spec.layers[layer])
    tail.load_state_dict({name: torch.from_numpy(np.asarray(value)) for name, value in state.items()})
    return tail.eval()
