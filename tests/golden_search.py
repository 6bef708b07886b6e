"""The demo's search, 50 RARTS steps, as a golden file: α, w and y must stay bitwise equal across refactors.

    python tests/golden_search.py --write   # regenerate tests/golden/search50-<cpu vendor>-<capability>.pt (a
                                            # deliberate change of the search's defaults only, in a commit of its
                                            # own that says why; or a new kind of CPU, from a known-good commit)

`tests/test_golden.py` runs `search_state()` and compares with the file. The run is `recipes/demo.yaml`'s search
(trained ResNet-20 from the shipped weights, RARTS, its optimizers, channels_last) on conftest's tiny learnable
images instead of CIFAR-10 (so CI needs no data): 800 + 800 images in batches of 16 = 50 α-steps, one thread.

One file per CPU vendor and instruction set (torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, ...): oneDNN
and ATen pick other kernels on AMD and Intel CPUs and on AVX2 and AVX512 ones, and 50 Adam steps on α (whose
gradient averages to about zero at a trained optimum) amplify their last-bit differences into different α (on an
AVX2 AMD EPYC the AVX512 file's α differ by up to 0.18, the weights by up to 1.2, while the commit that wrote it
and HEAD agree bitwise there), so a file is compared bitwise only on the kind of CPU, and the torch, that wrote it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def cpu_vendor() -> str:
    """The CPU's vendor id (`GenuineIntel`, `AuthenticAMD`, ...; `unknown` where /proc/cpuinfo has none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def cpu_kind() -> str:
    """`<vendor>-<instruction set>`, e.g. `AuthenticAMD-AVX2`: what decides the search's last bits on a CPU."""
    return f"{cpu_vendor()}-{torch.backends.cpu.get_cpu_capability()}"


GOLDEN = ROOT / "tests" / "golden" / f"search50-{cpu_kind()}.pt"
sys.path.insert(0, str(ROOT / "tests"))


def search_state() -> dict[str, torch.Tensor]:
    """α, w and y (parameters and buffers) after 50 steps of the demo's search, by name."""
    from conftest import tiny_images

    from slimrarts.api import search_width
    from slimrarts.commands.width import load_weights
    from slimrarts.data import CIFAR10_CLASSES, DeviceLoader, ImageSet, Loaders, split_halves
    from slimrarts.models import create_model
    from slimrarts.recipe import load_recipe

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions in one order, whatever the machine's core count
    try:
        recipe = load_recipe(ROOT / "recipes" / "demo.yaml", ["data.batch_size=16", "device=cpu"])
        train = ImageSet(*tiny_images(160, seed=3), classes=CIFAR10_CLASSES)
        test = ImageSet(*tiny_images(2, seed=4), classes=CIFAR10_CLASSES)
        idx_t, idx_v = split_halves(train.labels)
        loaders = Loaders(train=DeviceLoader(train, 16, train=True), test=DeviceLoader(test, 20, train=False),
                          search_t=DeviceLoader(train, 16, train=True, indices=idx_t, seed=1),
                          search_v=DeviceLoader(train, 16, train=True, indices=idx_v, seed=2))
        torch.manual_seed(recipe.seed)
        model = create_model(recipe.model.name, num_classes=10)
        load_weights(model, ROOT / recipe.model.weights)
        found = search_width(model, loaders, recipe, device=torch.device("cpu"), progress=False)
        out = {f"alpha.{i}": a.detach().clone() for i, a in enumerate(found.gates.alphas)}
        out |= {f"w.{k}": v.detach().clone() for k, v in found.state.w.items()}
        out |= {f"w_buffer.{k}": v.detach().clone() for k, v in found.state.w_buffers.items()}
        out |= {f"y.{k}": v.detach().clone() for k, v in found.state.y.items()}
        out |= {f"y_buffer.{k}": v.detach().clone() for k, v in found.state.y_buffers.items()}
        return {k: v.contiguous() for k, v in out.items()}
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    if "--write" not in sys.argv:
        sys.exit(__doc__)
    state = search_state()
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": state, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "torch": str(torch.__version__)}, GOLDEN)
    print(f"wrote {GOLDEN} ({len(state)} tensors)")


if __name__ == "__main__":
    main()
