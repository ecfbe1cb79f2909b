"""``push_to_hub`` of an hfptq model through the normal Transformers / huggingface_hub path, against a
local fake Hub (:mod:`tests.hub_server`, 127.0.0.1 only, stops by itself).

The push runs in a fresh interpreter because ``huggingface_hub`` reads ``HF_ENDPOINT``,
``HF_HUB_OFFLINE`` and ``HF_HUB_DISABLE_XET`` at import time. That interpreter quantizes a tiny
model, pushes it twice with ``model.push_to_hub`` (new repo, then an update of the existing repo)
and once with ``save_pretrained(..., push_to_hub=True)``, then downloads it back with
``from_pretrained(repo_id)`` through the same endpoint. This process then checks what arrived.

Exercised: ``create_repo`` (new and already existing), README metadata validation, ``preupload``,
the LFS batch API with the *basic* transfer (single PUT + verify) for ``*.safetensors``, regular
base64 files inside the NDJSON commit, ``create_commit``, ``ModelCard.load`` of an existing card,
and ``hf_hub_download`` (HEAD + GET ``resolve``) for the reload. Not exercised: Xet storage
(disabled with ``HF_HUB_DISABLE_XET=1``), multipart LFS uploads, pull requests / branches,
authentication flows beyond a bearer token, the real Hub's server-side checks.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors_bytes

import hfptq  # noqa: F401  (registers the method for the in-process reload)
from hfptq import checkpoint as ckpt
from hfptq.card import CARD_END
from hfptq.recipes import load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import FakeHub  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_hfptq_fake_token_for_tests"


def _env(hub: FakeHub, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTEST") and k.upper() not in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1", HF_HOME=str(home),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    return env


def test_push_to_hub_uploads_reloadable_checkpoint(tiny_model_dir, tmp_path):
    float_dir = tiny_model_dir("gemma3_text")  # tied embedding: the int8 LM head also serves the lookup
    with FakeHub(token=TOKEN, lifetime=300) as hub:
        script = f"""
            import sys, torch
            import hfptq
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained({str(float_dir)!r},
                                                         quantization_config=hfptq.HfPtqConfig())
            ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                before = model(ids).logits
            torch.save({{"ids": ids, "logits": before}}, {str(tmp_path / 'expected.pt')!r})
            model.push_to_hub("me/tiny-hfptq")
            model.push_to_hub("me/tiny-hfptq", commit_message="second push")   # repo exists, card exists
            model.save_pretrained({str(tmp_path / 'local')!r}, push_to_hub=True, repo_id="me/tiny-hfptq-2")
            again = AutoModelForCausalLM.from_pretrained("me/tiny-hfptq")   # download through HF_ENDPOINT
            with torch.no_grad():
                print("HUB_RELOAD_EQUAL", torch.equal(before, again(ids).logits))
        """
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                              timeout=280, env=_env(hub, tmp_path / "hf_home"), cwd=str(REPO))
        log = list(hub.log)
        repos = dict(hub.repos)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "HUB_RELOAD_EQUAL True" in proc.stdout

    # every step of the upload protocol was used, and nothing unexpected was asked for
    routes = {(m, p.split("?")[0]) for m, p, _ in log}
    assert ("POST", "/api/repos/create") in routes
    assert ("POST", "/api/models/me/tiny-hfptq/preupload/main") in routes
    assert ("POST", "/me/tiny-hfptq.git/info/lfs/objects/batch") in routes
    assert any(m == "PUT" and p.startswith("/__lfs__/") for m, p in routes)
    assert ("POST", "/api/models/me/tiny-hfptq/commit/main") in routes
    assert ("POST", "/api/models/me/tiny-hfptq-2/commit/main") in routes
    create_status = [s for m, p, s in log if p == "/api/repos/create"]
    assert create_status.count(200) == 2 and 409 in create_status  # the second push found the repo
    # the only 404s are optional-file probes: the existing model card (ModelCard.load before a push) and,
    # when peft is installed, Transformers' adapter_config.json check on reload (at the resolved commit)
    optional = {"README.md"} | ({"adapter_config.json"} if importlib.util.find_spec("peft") else set())
    not_found = {p for m, p, s in log if s == 404}
    assert all(re.fullmatch(r"/me/tiny-hfptq(-2)?/resolve/[0-9a-z]+/([\w.]+)", p) and p.rsplit("/", 1)[1] in optional
               for p in not_found), not_found
    assert all(s < 500 for _, _, s in log), [x for x in log if x[2] >= 500]

    repo = repos["me/tiny-hfptq"]
    assert len(repo.commits) == 2 and repo.commits[1]["summary"] == "second push"
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md",
            "hfptq_recipe.yaml"} <= set(repo.files)
    assert "model.safetensors" in repo.lfs_paths  # went through LFS, not inline

    config = json.loads(repo.files["config.json"])
    assert config["quantization_config"]["quant_method"] == "hfptq"
    assert config["quantization_config"]["plan"]["modules"]

    card = repo.files["README.md"].decode()
    assert card.count(CARD_END) == 1  # the second push replaced hfptq's section, did not append
    assert "automatically generated" not in card  # Transformers' default template was replaced
    assert 'from_pretrained("me/tiny-hfptq")' in card and "pip install hfptq" in card
    assert "- hfptq" in card.split("---")[1]
    card2 = repos["me/tiny-hfptq-2"].files["README.md"].decode()
    assert 'from_pretrained("me/tiny-hfptq-2")' in card2

    recipe_path = tmp_path / "pulled_recipe.yaml"
    recipe_path.write_bytes(repo.files["hfptq_recipe.yaml"])
    assert load_recipe(recipe_path).to_config().activations["mode"] == "dynamic"

    # the uploaded bytes are a valid hfptq checkpoint that reloads bit-exact here too
    tensors = load_safetensors_bytes(repo.files["model.safetensors"])
    assert tensors["lm_head.qweight"].dtype == torch.int8
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    for name, data in repo.files.items():
        (pulled / name).write_bytes(data)
    ckpt.verify_checkpoint(pulled)
    from transformers import AutoModelForCausalLM

    expected = torch.load(tmp_path / "expected.pt")
    model = AutoModelForCausalLM.from_pretrained(pulled)
    with torch.no_grad():
        assert torch.equal(model(expected["ids"]).logits, expected["logits"])

    # save_pretrained(push_to_hub=True) also kept the card locally
    assert 'from_pretrained("me/tiny-hfptq-2")' in (tmp_path / "local" / "README.md").read_text()


def test_fake_hub_rejects_bad_token_and_stops_by_itself():
    import http.client
    import time

    hub = FakeHub(token="right", lifetime=1.0).start()
    host, port = hub.url.replace("http://", "").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("POST", "/api/repos/create", body=json.dumps({"name": "x"}),
                 headers={"Authorization": "Bearer wrong", "Content-Type": "application/json"})
    assert conn.getresponse().status == 401
    conn.close()
    time.sleep(1.5)  # past its lifetime: the server has shut itself down
    with pytest.raises(OSError):
        conn = http.client.HTTPConnection(host, int(port), timeout=2)
        conn.request("GET", "/api/models/a/b")
        conn.getresponse()
