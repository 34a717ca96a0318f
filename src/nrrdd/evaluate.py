"""Students trained from scratch on a distilled set, with any label mode; results as JSON."""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nrrdd import NrrddError
from nrrdd.checkpoint import load_model
from nrrdd.config import help_field, to_dict
from nrrdd.data import Split, load_dataset, load_image_folder
from nrrdd.dist import barrier, init_from_env, is_main, mine, rank, world
from nrrdd.io import (check_finite, load_tensors, pick_device, prepare_out_dir, provenance, read_json, read_tensor_meta,
                      save_tensors, sha256_bytes, sha256_file, write_json, write_manifest)
from nrrdd.labels import LABEL_MODES, STORED_MODES, PlanSpec, label_slice, make_plan, mixed_batch, relabel, student_loss
from nrrdd.models import create_model
from nrrdd.train import TrainState, accuracy, param_groups


@dataclass
class StudentConfig:
    """Student recipe. Defaults follow RDED's evaluation (AdamW 1e-3, 300 epochs, flip + CutMix, T = 20)."""
    data: str = help_field("", "data set for validation/test (default: the one recorded in the distilled set)")
    student: str = help_field("convnet3", "student architecture (registry name)")
    width: int = help_field(128, "ConvNet width")
    norm: str = help_field("batch", "ConvNet norm: batch, instance, none")
    label_mode: str = help_field("sl-online", "labels: " + ", ".join(LABEL_MODES))
    epochs: int = help_field(300, "training epochs")
    batch_size: int = help_field(0, "batch size; 0: RDED's rule (10/50/100 for IPC 1/10/50, x2 at 100+ classes)")
    lr: float = help_field(1e-3, "AdamW learning rate")
    weight_decay: float = help_field(0.01, "AdamW weight decay (not on biases and norm weights)")
    cosine_span: float = help_field(2.0, "lr factor 0.5(1 + cos(pi e / (span E))): 2 ends at 0.5 (RDED), 1 at 0 (SRe2L)")
    temperature: float = help_field(20.0, "soft-label temperature T (KL at T, no T^2 factor)")
    mix: str = help_field("cutmix", "batch mix: cutmix, mixup, none")
    mix_alpha: float = help_field(1.0, "mix weight lambda ~ Beta(alpha, alpha)")
    crop_min: float = help_field(1.0, "random-resized-crop scale floor per image (1: off, as RDED at factor 1)")
    flip: bool = help_field(True, "random horizontal flip")
    r: float = help_field(0.3, "DBR hinge threshold r (Eq. 10); 0.3 and alpha_dbr 1 won the validation search")
    alpha_dbr: float = help_field(1.0, "DBR weight alpha_dbr of the distance-matching term (Eq. 9)")
    topk: int = help_field(2, "entries kept per sample by compact labels")
    plan_seed: int = help_field(0, "seed of the label plan (batches, crops, flips, mixes), shared by all modes")
    seeds: int = help_field(3, "number of student seeds (0, 1, ...)")
    first_seed: int = help_field(0, "first student seed")
    checkpoint_every: int = help_field(25, "epochs between resumable checkpoints")
    ddp: bool = help_field(False, "under torchrun, train each student with DistributedDataParallel, every rank a "
                           "share of each batch (for large distilled sets; differs from one process's run by float "
                           "rounding, and by per-rank BatchNorm statistics on CPU). Off: ranks train whole seeds, "
                           "bit for bit as one process would")

    def __post_init__(self):
        if self.label_mode not in LABEL_MODES:
            raise NrrddError(f"label_mode={self.label_mode!r}: choose one of {', '.join(LABEL_MODES)}")

    def model_kwargs(self) -> dict:
        return {"width": self.width, "norm": self.norm} if self.student.startswith("convnet") else {}


def auto_batch_size(ipc: int, num_classes: int, n: int) -> int:
    b = 10 if ipc <= 1 else 50 if ipc <= 10 else 100
    return min(n, b * (2 if num_classes >= 100 else 1))


def load_distilled(path) -> tuple[Split, list[str], dict]:
    """A distilled set: an nrrdd output folder (images/ + distill.json) or any ImageFolder of images."""
    path = Path(path)
    record = read_json(path / "distill.json") if (path / "distill.json").exists() else {}
    root = path / "images" if (path / "images").is_dir() else path
    split, classes, _ = load_image_folder(root, use_cache=False, progress=False)
    if record and set(classes) != set(record["classes"]):
        raise NrrddError(f"{root}: class folders {classes} differ from distill.json's {record['classes']}")
    return split, classes, record


def images_digest(images: torch.Tensor) -> str:
    return sha256_bytes(images.contiguous().numpy().tobytes())


def plan_spec(cfg: StudentConfig, n: int, ipc: int, num_classes: int, image_size: int) -> PlanSpec:
    bs = cfg.batch_size or auto_batch_size(ipc, num_classes, n)
    return PlanSpec(n, cfg.epochs, bs, image_size, cfg.mix, cfg.mix_alpha, cfg.crop_min, cfg.flip, cfg.plan_seed)


def store_labels(out_dir, teacher, images, labels, spec: PlanSpec, cfg: StudentConfig, mean, std,
                 progress=True) -> dict:
    """Relabel the plan once and write plan.safetensors (bookkeeping) + labels_<mode>.safetensors (payload)."""
    out_dir = Path(out_dir)
    plan = make_plan(spec)
    payload = relabel(teacher, images, labels, plan, spec, cfg.label_mode, cfg.topk, mean, std, progress)
    meta = {"plan": json.dumps(asdict(spec)), "images_sha256": images_digest(images.cpu()),
            "mode": cfg.label_mode, "topk": str(cfg.topk)}
    label_file = out_dir / f"labels_{cfg.label_mode}.safetensors"
    if not is_main():  # under torchrun, rank 0 writes what all ranks labelled
        return {}
    plan_bytes = save_tensors(out_dir / "plan.safetensors", plan)
    save_tensors(label_file, payload, meta)
    return label_accounting(label_file, plan_bytes, payload, spec, int(labels.max()) + 1)


def label_accounting(label_file: Path, plan_bytes: int, payload: dict, spec: PlanSpec, num_classes: int) -> dict:
    payload_bytes = sum(v.numel() * v.element_size() for v in payload.values())
    sl_bytes = spec.epochs * spec.num_images * num_classes * 2  # fp16 logits, C per mixed sample
    return {"label_file": label_file.name, "label_file_bytes": label_file.stat().st_size,
            "payload_bytes": payload_bytes, "bookkeeping_bytes": plan_bytes, "mixed_samples": spec.epochs * spec.num_images,
            "sl_payload_bytes": sl_bytes, "ratio_vs_sl": round(sl_bytes / payload_bytes, 3)}


def load_labels(label_dir, mode: str, spec: PlanSpec, images: torch.Tensor) -> tuple[dict, dict]:
    """Stored labels that belong to exactly this distilled set and plan, else a clear error."""
    f = Path(label_dir) / f"labels_{mode}.safetensors"
    if not f.exists():
        raise NrrddError(f"{f}: no stored '{mode}' labels here; run nrrdd relabel --label-mode {mode} first")
    meta = read_tensor_meta(f)
    if meta.get("images_sha256") != images_digest(images.cpu()):
        raise NrrddError(f"{f}: labels were made for other images than this distilled set; relabel it")
    if json.loads(meta.get("plan", "{}")) != asdict(spec):
        raise NrrddError(f"{f}: labels follow another plan ({meta.get('plan')}); the student recipe must match "
                         "the one used by relabel (epochs, batch size, mix, crop, flip, plan seed)")
    return load_tensors(f), meta


# ---------------------------------------------------------------- one student

def train_student(images, labels, num_classes, spec: PlanSpec, cfg: StudentConfig, seed: int, device,
                  mean, std, teacher=None, payload=None, state_path=None, progress=True, ddp=False):
    """Train one student from scratch on the plan; returns the model after the final epoch.
    With `ddp` (inside a torchrun process group) every rank trains the same model on its rows of each batch."""
    plan = {k: v.to(device) for k, v in make_plan(spec).items()}
    payload = {k: v.to(device) for k, v in (payload or {}).items()}
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = create_model(cfg.student, num_classes, images.shape[-1], images.shape[1], **cfg.model_kwargs()).to(device)
    net, rows = model, slice(None)
    if ddp:
        if spec.batch_size < world():
            raise NrrddError(f"--ddp: batch size {spec.batch_size} leaves some of the {world()} ranks no images")
        if device.type == "cuda":  # per-rank BatchNorm statistics over a few images each would change the recipe
            model = net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
        rows = slice(rank(), None, world())  # DDP averages the ranks' gradients: the whole batch's mean loss
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    state, start = (TrainState(state_path) if state_path else None), 0
    if state is not None and state.exists():
        start = state.load(model, opt, gen)["epoch"]
    saves = state is not None and (is_main() or not ddp)
    nb = math.ceil(spec.num_images / spec.batch_size)
    net.train()
    for epoch in tqdm(range(start, spec.epochs), desc=f"student seed {seed}", disable=not progress, leave=False,
                      initial=start, total=spec.epochs):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / (cfg.cosine_span * spec.epochs)))
        for b in range(nb):
            x, y_org, y_aug, lam = (t[rows] for t in mixed_batch(images, labels, plan, spec, epoch, b, mean, std))
            if cfg.label_mode == "sl-online":
                with torch.no_grad():
                    label = {"logits": teacher(x)}
            else:
                label = {k: v[rows] for k, v in label_slice(payload, spec, epoch, b, device).items()}
            loss = student_loss(cfg.label_mode, net(x), y_org, y_aug, lam, label, cfg.temperature, cfg.r,
                                cfg.alpha_dbr, num_classes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if saves and ((epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == spec.epochs):
            check_finite(loss, f"student seed {seed} epoch {epoch + 1}")
            state.save(model, opt, gen, epoch=epoch + 1)
    return model


# ---------------------------------------------------------------- evaluate: several seeds, one results file

def recipe(settings: dict) -> dict:
    """What makes two runs' per-seed results interchangeable: all but which seeds run and how often to save."""
    return {k: v for k, v in settings.items() if k not in ("seeds", "first_seed", "checkpoint_every")}


def evaluate(distilled, cfg: StudentConfig, out_dir, teacher_path=None, labels_dir=None, device="auto",
             resume=False, overwrite=False, progress=True, data=None) -> dict:
    out = Path(out_dir)
    settings = to_dict(cfg)
    split, classes, record = load_distilled(distilled)
    teacher_path = teacher_path or record.get("teacher", {}).get("path")
    # a resumed run may reuse per-seed results only if they come from the same images and teacher
    inputs = {"images_sha256": images_digest(split.images),
              "teacher_sha256": sha256_file(teacher_path) if teacher_path and Path(teacher_path).is_file() else None}

    def check_same_run(stored: dict) -> None:  # results.json and the unfinished-run file both hold these keys
        if recipe(stored.get("config", {})) != recipe(settings) or stored.get("inputs") != inputs:
            raise NrrddError(f"{out}: made with another student recipe, distilled set or teacher than this run; "
                             "pass --overwrite to replace it or choose another --out")

    if resume and (out / "results.json").exists() and (out / "manifest.json").exists():
        results = read_json(out / "results.json")
        check_same_run(results)
        if results["seeds"] == list(range(cfg.first_seed, cfg.first_seed + cfg.seeds)):
            return results
        # other seeds of the same recipe: train the missing ones, reuse the others' files
    t0 = time.time()
    dev = pick_device(device)
    init_from_env(dev)
    if is_main():
        prepare_out_dir(out_dir, overwrite=overwrite, resume=resume)
        (out / "manifest.json").unlink(missing_ok=True)  # marks a finished run; rewritten when this one ends
    barrier()
    progress = progress and is_main()
    spec_name = cfg.data or record.get("data", {}).get("spec")
    if not spec_name:
        raise NrrddError(f"{distilled}: no distill.json names the data set; pass --data for the test split")
    ds = data or load_dataset(spec_name, progress=progress)
    if classes != ds.classes:
        raise NrrddError(f"{distilled}: distilled classes {classes} do not match the test set's {ds.classes}")
    teacher, meta = (load_model(teacher_path, classes=ds.classes, device=dev) if teacher_path else (None, {}))
    mean, std = (meta["mean"], meta["std"]) if meta else (ds.mean, ds.std)
    ipc = record.get("ipc") or math.ceil(len(split) / len(classes))
    spec = plan_spec(cfg, len(split), ipc, len(classes), split.images.shape[-1])
    images, labels = split.images.to(dev), split.labels.to(dev)
    run_file = out / ".evaluate_config.json"  # present while unfinished: a --resume must use the same recipe
    if run_file.exists():
        check_same_run(read_json(run_file))
    barrier()  # every rank has read the old run file before rank 0 writes the new one
    if is_main():
        write_json(run_file, {"config": settings, "inputs": inputs})

    payload, labels_info = None, {}
    if cfg.label_mode in STORED_MODES:
        label_file = Path(labels_dir or out) / f"labels_{cfg.label_mode}.safetensors"
        if labels_dir is None and not label_file.exists():  # relabel here once; a resumed run reuses the file
            if teacher is None:
                raise NrrddError("stored labels need --teacher (or --labels from nrrdd relabel)")
            store_labels(out, teacher, images, labels, spec, cfg, mean, std, progress)
        barrier()
        payload, _ = load_labels(label_file.parent, cfg.label_mode, spec, images)
        labels_info = label_accounting(label_file, (label_file.parent / "plan.safetensors").stat().st_size, payload,
                                       spec, len(classes))
    elif cfg.label_mode == "sl-online" and teacher is None:
        raise NrrddError("label mode sl-online needs a teacher: pass --teacher")

    seeds, ddp = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds)), cfg.ddp and world() > 1
    for seed in seeds if ddp else mine(seeds):  # without DDP each rank trains whole seeds
        seed_file, state_file = out / "seeds" / f"seed_{seed}.json", out / "seeds" / f".state_{seed}.pt"
        if seed_file.exists():
            if is_main() or not ddp:
                state_file.unlink(missing_ok=True)  # killed between the two writes
            continue
        ts = time.time()
        model = train_student(images, labels, len(classes), spec, cfg, seed, dev, mean, std, teacher, payload,
                              state_path=state_file, progress=progress, ddp=ddp)
        if ddp and not is_main():
            continue
        r = {"seed": seed, "val_acc": accuracy(model, ds.val, mean, std, dev),
             "test_acc": accuracy(model, ds.test, mean, std, dev), "time_s": round(time.time() - ts, 1),
             "weights_sha256": sha256_bytes(b"".join(v.detach().cpu().contiguous().numpy().tobytes()
                                                     for v in model.state_dict().values()))}
        write_json(seed_file, r)
        state_file.unlink(missing_ok=True)
    barrier()
    if not is_main():
        return {}
    per_seed = [read_json(out / "seeds" / f"seed_{seed}.json") for seed in seeds]

    def stats(key):
        v = [r[key] for r in per_seed]
        return round(statistics.mean(v), 2), round(statistics.stdev(v), 2) if len(v) > 1 else 0.0

    (test_mean, test_std), (val_mean, val_std) = stats("test_acc"), stats("val_acc")
    results = {"kind": "evaluation", "distilled": str(distilled), "preset": record.get("preset"), "ipc": ipc,
               "data": spec_name, "teacher": str(teacher_path) if teacher_path else None,
               "teacher_arch": meta.get("arch"), "config": asdict(cfg), "plan": asdict(spec),
               "inputs": inputs, "seeds": [r["seed"] for r in per_seed], "per_seed": per_seed, "test_mean": test_mean,
               "test_std": test_std, "val_mean": val_mean, "val_std": val_std, "labels": labels_info,
               "distilled_config": record.get("config"), "processes": world(),
               "wall_time_s": round(time.time() - t0, 1), **provenance()}
    write_json(out / "results.json", results)
    run_file.unlink()
    write_manifest(out, {"kind": "evaluation"})
    return results
