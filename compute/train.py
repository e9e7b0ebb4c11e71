"""Training the networks whose units are ablated (``python -m compute.train``), alone or with DistributedDataParallel.

Two kinds of training, one command:

* The demo CNNs on SynthScenes: ``--model demo --variant baseline|bn|dropout`` (or ``--model demo-bn`` ...). The
  whole training split (a few thousand 64x64 images) is decoded once into a uint8 tensor, so an epoch is a few
  seconds on two CPU cores.
* AlexNet on an ImageFolder training set (``<class>/<image>``, folders sorted = class index, one folder per class of
  the model): ``--model alexnet-places|alexnet-imagenet --variant baseline|bn|dropout --data TRAIN_DIR``. That
  belongs on GPUs: ``torchrun --nproc-per-node 8 -m compute.train --model alexnet-places --variant bn --data
  /data/places365_standard/train --val /data/places365_standard/val``.

The variants are the paper's Sec. 3.5: ``bn`` puts batch norm after every conv (before its ReLU), ``dropout`` puts
channel dropout (``Dropout2d(0.5)``) after conv5's ReLU. In every variant a unit is ablated by setting its ReLU output
to zero (see compute/models/variants.py for why this, not zeroing the conv's weights, is the ablation under batch
norm).

Distributed: launched by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment), every
process trains its share of each batch under DistributedDataParallel, with nccl on GPUs and gloo on the CPU; the
trained parameters are checked to be identical on every rank, and rank 0 alone evaluates and writes the weights.
Weights go to ``<data>/weights/<model>-seed<seed>.pt`` (a plain state dict), written under a temporary name, so a
killed run never leaves a file that a later run would take for trained weights. AlexNet training also keeps
``<weights>.resume`` after every epoch and picks it up when restarted with the same settings.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import distributed as dist
from tqdm import tqdm

from compute import paths
from compute.run.distributed import Dist, current
from compute.errors import UserError, run_cli

DEFAULTS = {"epochs": 14, "batch_size": 64, "lr": 0.02, "momentum": 0.9, "weight_decay": 5e-4}
# torchvision's reference recipe for AlexNet (batch 256 in all, step decay every 30 epochs).
IMAGEFOLDER_DEFAULTS = {"epochs": 90, "batch_size": 256, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
                        "lr_step": 30}
VARIANTS = ("baseline", "bn", "dropout")


# -- distributed plumbing ------------------------------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


@contextmanager
def process_group():
    """Join torchrun's process group (nccl when there are GPUs, gloo otherwise) for the duration of the block."""
    if not launched_by_torchrun():
        yield Dist()
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def train_device(where: Dist) -> torch.device:
    return torch.device(f"cuda:{where.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def wrap(model: torch.nn.Module, where: Dist, device: torch.device) -> torch.nn.Module:
    """The module to train: DDP around the model in a group of several (batch norm synchronised on GPUs, where
    SyncBatchNorm runs; on the CPU each rank normalises its own share and DDP broadcasts rank 0's statistics)."""
    if where.world == 1:
        return model
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    devices = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=devices)


def check_replicas(model: torch.nn.Module, where: Dist) -> None:
    """DDP keeps every rank's parameters identical; a difference means the ranks trained apart, so nothing is saved."""
    if where.world == 1:
        return
    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().cpu().numpy().tobytes())
    digests = [None] * where.world
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"parameters differ between ranks after training ({len(set(digests))} versions)")


def share(value, where: Dist):
    """Rank 0's value on every rank."""
    if where.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_atomically(state, path: Path) -> None:
    """torch.save under a temporary name, then rename: a killed run leaves no truncated file under ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(state, temporary)
    os.replace(temporary, path)


def unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


# -- the demo CNNs on SynthScenes ----------------------------------------------------------------------------------
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


def evaluate(model, images, labels, preprocess, batch_size=256, device=torch.device("cpu")) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = preprocess.normalise(images[start:start + batch_size].to(device))
            correct += (model(x).argmax(1).cpu() == labels[start:start + batch_size]).sum().item()
    return correct / len(images)


def train_demo(model_name: str = "demo", seed: int = 0, data_dir=None, epochs: int | None = None,
               data_seed: int = 0, dataset_root=None) -> dict:
    """Train one demo model; returns {'path', 'val_accuracy', 'seconds'}.

    The data set is SynthScenes with ``data_seed`` in the data directory, or ``dataset_root`` when given (tests
    train on a tiny one). Inside a torchrun process group every rank takes its slice of each batch of the same
    shuffled order (one order for all: the generator is seeded alike), so the group trains on what one process would,
    batch by batch.
    """
    from compute.data import synthscenes
    from compute.models import get_spec
    from compute.models.demo import weights_file

    spec = get_spec(model_name)
    if spec.arch != "demo":
        raise UserError(f"train_demo trains the demo models only (demo, demo-bn, demo-dropout), not {model_name}")
    where = current()
    device = train_device(where)
    data_dir = paths.data_dir(data_dir)
    root = Path(dataset_root) if dataset_root else synthscenes.ensure(data_dir, seed=data_seed)
    train_x, train_y = load_split(root, "train")
    val_x, val_y = load_split(root, "val")
    settings = dict(DEFAULTS, epochs=epochs or DEFAULTS["epochs"])
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = spec.build(spec.num_classes).to(device)
    net = wrap(model, where, device)
    model = unwrapped(net)  # what DDP trains (SyncBatchNorm swapped in on GPUs); evaluated and saved
    if where.world > 1:
        torch.manual_seed(seed * 7919 + where.rank)  # dropout masks differ between ranks, as between batches
    optimiser = torch.optim.SGD(net.parameters(), lr=settings["lr"], momentum=settings["momentum"],
                                weight_decay=settings["weight_decay"])
    steps_per_epoch = (len(train_x) + settings["batch_size"] - 1) // settings["batch_size"]
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=settings["lr"],
                                                   total_steps=settings["epochs"] * steps_per_epoch)
    started = time.time()
    loss_fn = torch.nn.CrossEntropyLoss()
    with tqdm(total=settings["epochs"] * steps_per_epoch, desc=f"training {model_name} seed {seed}",
              unit="step", disable=not where.is_main) as bar:
        for epoch in range(settings["epochs"]):
            net.train()
            order = torch.randperm(len(train_x), generator=generator)
            for start in range(0, len(order), settings["batch_size"]):
                batch = order[start:start + settings["batch_size"]]
                images = _augment(train_x[batch], generator)  # every rank draws the same flips: generators stay equal
                if len(batch) >= where.world:  # a last batch too small to give every rank an image is skipped by all
                    mine = slice(where.rank, None, where.world)
                    x = spec.preprocess.normalise(images[mine].to(device))
                    loss = loss_fn(net(x), train_y[batch][mine].to(device))
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
                schedule.step()
                bar.update(1)
    check_replicas(model, where)
    path = weights_file(model_name, seed, data_dir)
    accuracy = None
    if where.is_main:
        accuracy = evaluate(model, val_x, val_y, spec.preprocess, device=device)
        save_atomically(model.state_dict(), path)
    accuracy = share(accuracy, where)
    seconds = time.time() - started
    if where.is_main:
        print(f"{model_name} seed {seed}: validation accuracy {accuracy:.3f} (chance {1 / spec.num_classes:.3f}), "
              f"{seconds:.0f} s on {where.world} x {device.type}, saved to {path}")
    return {"path": path, "val_accuracy": accuracy, "seconds": seconds}


# -- AlexNet (and its variants) on an ImageFolder ------------------------------------------------------------------
def imagefolder(directory, spec, train: bool):
    """The ImageFolder at ``directory`` with training augmentation or the evaluation transform; its classes must be
    the model's."""
    from torchvision import datasets, transforms

    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise UserError(f"training folder {directory} not found: pass --data pointing at an ImageFolder "
                        f"(<class>/<image>)")
    prep = spec.preprocess
    transform = transforms.Compose([
        transforms.RandomResizedCrop(prep.crop), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(prep.mean, prep.std)]) if train else prep.transform()
    try:
        data = datasets.ImageFolder(str(directory), transform=transform)
    except (FileNotFoundError, RuntimeError) as error:
        raise UserError(f"{directory} is not an ImageFolder ({error}): lay it out as <class>/<image>") from None
    if len(data.classes) != spec.num_classes:
        raise UserError(f"{directory} has {len(data.classes)} class folders but {spec.name} predicts "
                        f"{spec.num_classes}: pass a training set with one folder per class of the model")
    return data


def _loader(data, batch_size: int, workers: int, device, sampler=None) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                       drop_last=sampler is not None)


def _autocast(device):
    """bfloat16 matmuls on GPUs (the usual mixed-precision training; batch norm and the loss stay float32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def distributed_accuracy(model, data, batch_size: int, workers: int, device, where: Dist) -> float:
    """Top-1 accuracy; each rank evaluates every world-th image and the counts are summed."""
    part = torch.utils.data.Subset(data, range(where.rank, len(data), where.world))
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    model.eval()
    with torch.no_grad(), _autocast(device):
        for x, y in torch.utils.data.DataLoader(part, batch_size=batch_size, num_workers=workers,
                                                pin_memory=device.type == "cuda"):
            y = y.to(device)
            counts[0] += (model(x.to(device)).argmax(1) == y).sum()
            counts[1] += len(y)
    if where.world > 1:
        dist.all_reduce(counts)
    return float(counts[0] / counts[1])


def train_imagefolder(model_name: str, train_dir, seed: int = 0, data_dir=None, epochs: int | None = None,
                      batch_size: int | None = None, lr: float | None = None, val_dir=None,
                      workers: int | None = None, max_steps: int | None = None) -> dict:
    """Train an AlexNet registry entry (baseline or variant) from scratch; returns {'path', 'val_accuracy',
    'seconds'} (accuracy None without ``val_dir``). ``batch_size`` is the total over all ranks; ``max_steps`` caps
    the steps per epoch (a quick check of a set-up before the real run)."""
    from compute.models import get_spec
    from compute.models.demo import weights_file

    spec = get_spec(model_name)
    where = current()
    device = train_device(where)
    settings = dict(IMAGEFOLDER_DEFAULTS, **{k: v for k, v in dict(epochs=epochs, batch_size=batch_size, lr=lr).items()
                                             if v is not None})
    per_rank = settings["batch_size"] // where.world
    if per_rank < 1:
        raise UserError(f"--batch-size {settings['batch_size']} is smaller than the {where.world} processes")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = workers if workers is not None else max(0, min(8, cpus // where.world - 1))
    train = imagefolder(train_dir, spec, train=True)
    val = imagefolder(val_dir, spec, train=False) if val_dir else None
    sampler = torch.utils.data.DistributedSampler(train, num_replicas=where.world, rank=where.rank, shuffle=True,
                                                  seed=seed, drop_last=True)
    loader = _loader(train, per_rank, workers, device, sampler)
    torch.manual_seed(seed)
    model = spec.build(spec.num_classes).to(device)
    net = wrap(model, where, device)
    model = unwrapped(net)  # what DDP trains (SyncBatchNorm swapped in on GPUs); evaluated and saved
    torch.manual_seed(seed * 7919 + where.rank)
    optimiser = torch.optim.SGD(net.parameters(), lr=settings["lr"], momentum=settings["momentum"],
                                weight_decay=settings["weight_decay"])
    schedule = torch.optim.lr_scheduler.StepLR(optimiser, step_size=settings["lr_step"], gamma=0.1)
    path = weights_file(model_name, seed, paths.data_dir(data_dir))
    resume = path.with_name(path.name + ".resume")
    first = _resume(resume, settings, model, optimiser, schedule, device)
    loss_fn = torch.nn.CrossEntropyLoss()
    started = time.time()
    for epoch in range(first, settings["epochs"]):
        sampler.set_epoch(epoch)
        net.train()
        steps = min(len(loader), max_steps or len(loader))
        with tqdm(total=steps, desc=f"{model_name} epoch {epoch + 1}/{settings['epochs']}", unit="step",
                  disable=not where.is_main) as bar:
            for step, (x, y) in enumerate(loader):
                if step >= steps:
                    break
                with _autocast(device):
                    loss = loss_fn(net(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        schedule.step()
        if where.is_main:
            save_atomically({"model": model.state_dict(), "optimiser": optimiser.state_dict(),
                             "schedule": schedule.state_dict(), "epoch": epoch + 1, "settings": settings}, resume)
    check_replicas(model, where)
    accuracy = distributed_accuracy(model, val, per_rank, workers, device, where) if val is not None else None
    if where.is_main:
        save_atomically(model.state_dict(), path)
        resume.unlink(missing_ok=True)
        shown = "no --val" if accuracy is None else f"validation accuracy {accuracy:.3f}"
        print(f"{model_name} seed {seed}: {shown}, {time.time() - started:.0f} s on {where.world} x {device.type}, "
              f"saved to {path}; analyse with `python -m compute.all --model {model_name} --weights {path} "
              f"--data VAL_DIR`")
    if where.world > 1:
        dist.barrier()
    return {"path": path, "val_accuracy": accuracy, "seconds": time.time() - started}


def _resume(resume: Path, settings: dict, model, optimiser, schedule, device) -> int:
    """The first epoch to run: after the last finished one of an interrupted run with the same settings, else 0."""
    if not resume.is_file():
        return 0
    state = torch.load(resume, map_location=device, weights_only=True)
    if state.get("settings") != settings:
        return 0
    model.load_state_dict(state["model"])
    optimiser.load_state_dict(state["optimiser"])
    schedule.load_state_dict(state["schedule"])
    print(f"resuming {resume.name} after epoch {state['epoch']}")
    return int(state["epoch"])


# -- command line --------------------------------------------------------------------------------------------------
def model_name(model: str, variant: str) -> str:
    """Registry name of a model and variant: demo + bn -> demo-bn; alexnet-places + baseline -> alexnet-places."""
    from compute.models import get_spec

    name = model if variant == "baseline" else f"{model}-{variant}"
    spec = get_spec(name)
    if spec.arch not in ("demo", "alexnet"):
        raise UserError(f"compute.train trains the demo CNNs and AlexNet, not {spec.arch}: choose --model demo, "
                        f"alexnet-places or alexnet-imagenet")
    return name


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m compute.train", description=__doc__.splitlines()[0],
                                     epilog="Distributed: torchrun --nproc-per-node N -m compute.train ...")
    parser.add_argument("--model", default="demo", help="demo (or demo-bn, demo-dropout), alexnet-places or "
                                                        "alexnet-imagenet")
    parser.add_argument("--variant", default="baseline", choices=VARIANTS,
                        help="baseline, bn (batch norm after every conv) or dropout (channel dropout on conv5)")
    parser.add_argument("--data", default=None, help="training data: an ImageFolder for AlexNet (required); for the "
                                                     "demo a SynthScenes root (default: generated in the data dir)")
    parser.add_argument("--val", default=None, help="AlexNet: an ImageFolder validation set to report accuracy on")
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds (instances)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="AlexNet: total over all processes (256)")
    parser.add_argument("--lr", type=float, default=None, help="AlexNet: learning rate (0.01, /10 every 30 epochs)")
    parser.add_argument("--workers", type=int, default=None, help="AlexNet: image decoding workers per process")
    parser.add_argument("--max-steps", type=int, default=None, help="AlexNet: at most N steps per epoch (a trial)")
    parser.add_argument("--data-dir", default=None, help=f"data directory (default ${paths.DATA_ENV} or ./data)")
    parser.add_argument("--force", action="store_true", help="retrain even if weights exist")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from compute.models import get_spec
    from compute.models.demo import weights_file

    args = parse_args(argv)
    name = model_name(args.model, args.variant)
    demo = get_spec(name).arch == "demo"
    if demo and any(v is not None for v in (args.val, args.batch_size, args.lr, args.workers, args.max_steps)):
        raise UserError("--val, --batch-size, --lr, --workers and --max-steps apply to AlexNet training only")
    if not demo and not args.data:
        raise UserError(f"{name} trains on an ImageFolder training set: pass --data TRAIN_DIR")
    with process_group():
        for seed in args.seed:
            if weights_file(name, seed, paths.data_dir(args.data_dir)).exists() and not args.force:
                print(f"{name} seed {seed}: already trained (use --force to retrain)")
                continue
            if demo:
                train_demo(name, seed=seed, data_dir=args.data_dir, epochs=args.epochs, dataset_root=args.data)
            else:
                train_imagefolder(name, args.data, seed=seed, data_dir=args.data_dir, epochs=args.epochs,
                                  batch_size=args.batch_size, lr=args.lr, val_dir=args.val, workers=args.workers,
                                  max_steps=args.max_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
