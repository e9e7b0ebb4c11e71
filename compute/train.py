"""Training the demo CNNs on SynthScenes (``python -m compute.train``).

The whole training split (a few thousand 64x64 images) is decoded once into a uint8 tensor, so an epoch is a few
seconds on two CPU cores. Weights go to ``<data>/weights/<model>-seed<seed>.pt`` (a plain state dict) and are written
under a temporary name, so a killed run never leaves a file that a later run would take for trained weights.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from compute import paths
from compute.errors import UserError, run_cli

DEFAULTS = {"epochs": 14, "batch_size": 64, "lr": 0.02, "momentum": 0.9, "weight_decay": 5e-4}


def load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from compute.data.filelist import read_file_list

    files, labels = read_file_list(Path(root) / f"{split}.txt")
    images = np.stack([np.asarray(Image.open(Path(root) / "images" / f).convert("RGB")) for f in files])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips: scenes keep their class when mirrored."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    images = images.clone()
    images[flip] = images[flip].flip(-1)
    return images


def evaluate(model, images, labels, preprocess, batch_size=256) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = _normalise(images[start:start + batch_size], preprocess)
            correct += (model(x).argmax(1) == labels[start:start + batch_size]).sum().item()
    return correct / len(images)


def _normalise(images_u8, preprocess):
    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - mean) / std


def train_demo(model_name: str = "demo", seed: int = 0, data_dir=None, epochs: int | None = None,
               data_seed: int = 0, dataset_root=None) -> dict:
    """Train one demo model; returns {'path', 'val_accuracy', 'seconds'}.

    The data set is SynthScenes with ``data_seed`` in the data directory, or ``dataset_root`` when given (tests
    train on a tiny one).
    """
    from compute.data import synthscenes
    from compute.models import get_spec
    from compute.models.demo import weights_file

    spec = get_spec(model_name)
    if spec.arch != "demo":
        raise UserError(f"compute.train trains the demo models only (demo, demo-bn, demo-dropout), not {model_name}")
    data_dir = paths.data_dir(data_dir)
    root = Path(dataset_root) if dataset_root else synthscenes.ensure(data_dir, seed=data_seed)
    train_x, train_y = load_split(root, "train")
    val_x, val_y = load_split(root, "val")
    settings = dict(DEFAULTS, epochs=epochs or DEFAULTS["epochs"])
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = spec.build(spec.num_classes)
    optimiser = torch.optim.SGD(model.parameters(), lr=settings["lr"], momentum=settings["momentum"],
                                weight_decay=settings["weight_decay"])
    steps_per_epoch = (len(train_x) + settings["batch_size"] - 1) // settings["batch_size"]
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=settings["lr"],
                                                   total_steps=settings["epochs"] * steps_per_epoch)
    started = time.time()
    loss_fn = torch.nn.CrossEntropyLoss()
    with tqdm(total=settings["epochs"] * steps_per_epoch, desc=f"training {model_name} seed {seed}",
              unit="step") as bar:
        for epoch in range(settings["epochs"]):
            model.train()
            order = torch.randperm(len(train_x), generator=generator)
            for start in range(0, len(order), settings["batch_size"]):
                batch = order[start:start + settings["batch_size"]]
                x = _normalise(_augment(train_x[batch], generator), spec.preprocess)
                loss = loss_fn(model(x), train_y[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    accuracy = evaluate(model, val_x, val_y, spec.preprocess)
    path = weights_file(model_name, seed, data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(model.state_dict(), temporary)
    os.replace(temporary, path)
    seconds = time.time() - started
    print(f"{model_name} seed {seed}: validation accuracy {accuracy:.3f} (chance {1 / spec.num_classes:.3f}), "
          f"{seconds:.0f} s, saved to {path}")
    return {"path": path, "val_accuracy": accuracy, "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compute.train", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="demo, demo-bn or demo-dropout")
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds (instances)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--data-dir", default=None, help=f"data directory (default ${paths.DATA_ENV} or ./data)")
    parser.add_argument("--force", action="store_true", help="retrain even if weights exist")
    args = parser.parse_args(argv)
    from compute.models.demo import weights_file

    for seed in args.seed:
        if weights_file(args.model, seed, paths.data_dir(args.data_dir)).exists() and not args.force:
            print(f"{args.model} seed {seed}: already trained (use --force to retrain)")
            continue
        train_demo(args.model, seed=seed, data_dir=args.data_dir, epochs=args.epochs)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
