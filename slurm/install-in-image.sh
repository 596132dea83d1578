#!/usr/bin/env bash
# Install trainctl[train] into a container image's Python without replacing anything the image has.
#
#   install-in-image.sh TRAINCTL_SOURCE      (a checkout, or any pip requirement path; PYTHON=python)
#
# Run by slurm/Containerfile (docker, podman) and inside `enroot start --root --rw` (slurm/README.md).
# An NGC PyTorch image's torch is NVIDIA's own build (a version such as 2.12.0a0+git...), compiled
# against the image's CUDA, cuDNN and NCCL; pip must not swap it for a PyPI wheel. So every
# distribution the image has becomes a constraint at the version it has (`pip list --format=freeze`,
# which names versions, never local paths): pip may add packages, never replace one. NGC images
# since 25.03 ship /etc/pip/constraint.txt for the same reason; this works on images without it.
# A [train] requirement the image cannot meet then fails the build here, loudly, instead of
# replacing a package the image was tested with.
set -euo pipefail

src=${1:?usage: install-in-image.sh TRAINCTL_SOURCE}
python=${PYTHON:-python}
constraints=$(mktemp --suffix=.txt)
trap 'rm -f "$constraints"' EXIT

"$python" -m pip list --format=freeze --disable-pip-version-check > "$constraints"
torch_before=$("$python" -c 'import importlib.metadata as m; print(m.version("torch"))')
echo "install-in-image: the image's torch is $torch_before; holding it and $(wc -l < "$constraints") other packages"

"$python" -m pip install --no-cache-dir --disable-pip-version-check -c "$constraints" "${src}[train]"

torch_after=$("$python" -c 'import importlib.metadata as m; print(m.version("torch"))')
if [ "$torch_after" != "$torch_before" ]; then
  echo "install-in-image: torch changed from $torch_before to $torch_after; the image's build must stay" >&2
  exit 1
fi

# The job script starts torchrun with these (launch/executors/sbatch.py); an older torchrun refuses them.
help=$("$python" -m torch.distributed.run --help)
for flag in --signals-to-handle --shutdown-timeout; do
  if ! grep -q -- "$flag" <<< "$help"; then
    echo "install-in-image: this image's torchrun ($torch_before) has no $flag, which trainctl's job script" \
         "passes; use a newer base image" >&2
    exit 1
  fi
done
"$python" -m launch --help > /dev/null  # trainctl itself starts (the login-side CLI, no GPU needed)
echo "install-in-image: trainctl[train] installed beside torch $torch_after"
