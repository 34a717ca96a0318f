"""Run by test_distributed.py, alone or under torchrun: one small student on digits, with --ddp split across the
ranks; each rank saves its final weights and how many rows it trained on (and a lone run its initial ones) as <out>_<what>.safetensors."""
import sys

import torch
from safetensors.torch import save_file

from nrrdd.checkpoint import load_model
from nrrdd.config import StudentConfig
from nrrdd.data import load_dataset
from nrrdd.evaluate import train_student
from nrrdd.models import create_model
from nrrdd.relabel import plan_spec
from nrrdd.runtime import init_from_env, rank


teacher_path, out, ddp = sys.argv[1], sys.argv[2], "--ddp" in sys.argv
dev = torch.device("cpu")
init_from_env(dev)
ds = load_dataset("digits", progress=False)
images, labels = ds.train.images[:40], ds.train.labels[:40]
teacher, meta = load_model(teacher_path, classes=ds.classes, device=dev)
rows = []  # the online teacher labels exactly the rows this rank trains on
teacher.register_forward_hook(lambda module, inputs, output: rows.append(len(inputs[0])))
cfg = StudentConfig(norm="none", width=16, epochs=2, batch_size=20)
spec = plan_spec(cfg, len(images), ds.num_classes, images.shape[-1])
model, _ = train_student(images, labels, ds.num_classes, spec, cfg, 0, dev, (meta["mean"], meta["std"]), teacher,
                      progress=False, ddp=ddp)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}_rank{rank()}.safetensors",
          metadata={"rows": str(sum(rows))})
if not ddp:
    torch.manual_seed(0)  # the initialisation train_student starts from
    init = create_model(cfg.student, ds.num_classes, images.shape[-1], images.shape[1], **cfg.model_kwargs())
    save_file({k: v.contiguous() for k, v in init.state_dict().items()}, f"{out}_init.safetensors")
