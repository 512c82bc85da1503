"""The console in a real Chromium (Debian's ``chromium`` through Playwright; no browser
download) against a running system: a gateway process, a ``tunegate trainer worker`` process on
real Redis training the real SmolLM2 on CPU, and a fake engine replica.

It signs in (a user key is refused), watches a real job's loss curve grow to three points and
more, sees the version registered, starts a promotion and rolls it back, labels a sampled answer
and finds the label in SQL, creates and revokes a key, and signs out. Screenshots of each page
at 1280x800 (and the overview at phone width) go to ``tests/artifacts/console/``."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from shared.data import write_jsonl
from shared.traffic_records import TrafficSample
from tests.gateway.conftest import Records, fake_replica, gateway
from tests.procs import stop
from trainer.data_sources import build_splits

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "console"
MODEL = "SmolLM2-135M-Instruct"
sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium "
                                "(scripts/setup.sh installs it)")


@pytest.fixture(scope="module")
def system(data_dir: Path, redis_url: str, default_model_dir: Path,
           records: Records) -> Iterator[dict[str, Any]]:
    (data_dir / "models").mkdir(exist_ok=True)
    link = data_dir / "models" / MODEL
    if not link.exists():
        link.symlink_to(default_model_dir, target_is_directory=True)
    queue = f"tunegate:test:{secrets.token_hex(4)}"
    stream = f"tunegate:test:traffic:{secrets.token_hex(4)}"
    env = {"TUNEGATE_DATA_DIR": str(data_dir), "TUNEGATE_DATABASE_URL": "",
           "TUNEGATE_ARTIFACT_STORE": "", "REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1",
           "TUNEGATE_TRAINER_QUEUE_NAME": queue, "TUNEGATE_TRAINER_PROGRESS_INTERVAL_S": "0",
           "TUNEGATE_TRAFFIC_STREAM": stream}
    log = (data_dir / "console-worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "tunegate", "trainer", "worker"],
                              env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEGATE_TRAINER_QUEUE_NAME", queue)
        gw_env = {"TUNEGATE_TRAFFIC_STREAM": stream, "TUNEGATE_GATEWAY_SAMPLE_FLUSH_S": "0.01"}
        with fake_replica("r1") as (engine, _), \
                gateway(data_dir, [engine], redis_url, env=gw_env) as url:
            admin = records.key("admin")
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=admin, max_retries=0)
            try:
                yield {"client": client, "url": url, "records": records, "admin": admin,
                       "data_dir": data_dir}
            finally:
                stop(worker)
                log.close()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def wait_for(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.timeout(3000)  # a real tune on a shared 2-core machine
def test_console_end_to_end(system: dict[str, Any]) -> None:
    url, records, client = system["url"], system["records"], system["client"]
    train, golden = build_splits(n_train=64, n_golden=4, seed=0)
    f_train = client.files.create(file=write_jsonl(system["data_dir"] / "cb.jsonl", train).open(
        "rb"), purpose="fine-tune")
    f_golden = client.files.create(file=write_jsonl(system["data_dir"] / "cbg.jsonl", golden)
                                   .open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=f_train.id, suffix="cb", seed=0,
        hyperparameters={"batch_size": 4, "n_epochs": 1},
        extra_body={"golden_file": f_golden.id, "max_steps": 4, "gate_threshold": 0.0,
                    "evaluate_base": True})

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM),
                                     args=["--no-sandbox", "--disable-gpu"])
        ctx = browser.new_context(viewport={"width": 1280, "height": 800})
        page = ctx.new_page()
        page.on("dialog", lambda d: d.accept())  # every action's confirmation: yes
        page.goto(f"{url}/console")

        # A user key is refused, and no session cookie is set.
        page.fill("#key", records.key("user"))
        page.click("#signin-form button")
        page.wait_for_selector("#signin-error:has-text('admin key')")
        assert not ctx.cookies()
        # Sign in by keyboard: Tab to the field, type, Enter.
        page.focus("#key")
        page.keyboard.type(system["admin"])
        page.keyboard.press("Enter")
        page.wait_for_selector("#nav:not([hidden])")
        [cookie] = ctx.cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert page.evaluate("JSON.stringify(window.localStorage)") == "{}"
        page.wait_for_selector("text=Replicas")
        shot(page, "overview")

        # Jobs: the live loss curve grows to at least three points, then the version lands.
        page.goto(f"{url}/console#/jobs/{job.id}")
        page.wait_for_function(
            "() => { const p = document.querySelector('#loss-chart polyline');"
            " return p && Number(p.dataset.points) >= 3; }", timeout=1_500_000)
        shot(page, "job-running")
        page.wait_for_selector("text=model: ", timeout=1_200_000)
        page.wait_for_selector("#view .badge.succeeded")
        shot(page, "job")
        page.goto(f"{url}/console#/jobs")
        page.wait_for_selector(f"text={job.id}")
        shot(page, "jobs")

        # Models: the job's version is registered (the name's first: stable at once); start a
        # promotion of a further version and roll it back.
        v2 = records.adapter("cb", stable=False)
        page.goto(f"{url}/console#/models/cb")
        page.wait_for_selector("td:has-text('v1')")
        page.select_option("#version-pick", v2.split("@v")[1])
        page.click("button:has-text('Start promotion')")
        page.wait_for_selector("rect.current[data-state='candidate']")
        page.click("button:has-text('Roll back')")
        page.wait_for_selector("rect.current[data-state='rejected']")
        shot(page, "models")
        assert records.registry.get_adapter("cb")["aliases"]["stable"] == 1

        # Traffic: a sampled answer, labelled in the console, is feedback of this admin in SQL.
        user = openai.OpenAI(base_url=f"{url}/v1", api_key=records.key("user", sample_rate=1.0),
                             max_retries=0)
        user.chat.completions.create(model="cb", messages=[{"role": "user",
                                                            "content": "a fine film"}])

        def sampled() -> TrafficSample | None:
            with records.db.session() as s:
                return s.query(TrafficSample).filter_by(name="cb").first()

        row = wait_for(sampled, 60, "the sample in SQL")
        page.goto(f"{url}/console#/traffic")
        page.fill("#traffic-filter input[name=model]", "cb")
        page.click("#traffic-filter button")
        page.click("tr.click >> nth=0")
        page.fill("#label-input", "fresh")
        page.click("#save-label")
        page.wait_for_selector("#sample-detail .ok")
        shot(page, "traffic")
        with records.db.session() as s:
            got = s.get(TrafficSample, row.id)
            assert got is not None and got.label == "fresh"
            assert got.feedback_key_id

        # Keys: created (secret shown once), then revoked.
        page.goto(f"{url}/console#/keys")
        page.fill("#key-form input[name=name]", "console-made")
        page.click("#key-form button")
        secret = page.wait_for_selector("#secret").inner_text()
        assert secret.startswith("tg-")
        made = next(k for k in records.keys.list() if k.name == "console-made")
        page.click(f"button[data-key='{made.id}']")
        wait_for(lambda: records.keys.get(made.id).revoked_at, 10, "the revocation")
        page.wait_for_selector(f"tr:has-text('{made.id}') .badge.revoked")
        shot(page, "keys")

        # Phone width: nothing wider than the screen.
        page.set_viewport_size({"width": 390, "height": 844})
        page.goto(f"{url}/console#/overview")
        page.wait_for_selector("text=Replicas")
        assert page.evaluate("document.documentElement.scrollWidth") <= 392
        shot(page, "overview-phone")

        # Sign out: the cookie no longer opens anything.
        page.click("#signout")
        page.wait_for_selector("#signin:not([hidden])")
        assert page.request.get(f"{url}/admin/keys").status == 401
        browser.close()
    docs = Path(__file__).resolve().parents[2] / "docs" / "img"
    if os.environ.get("TUNEGATE_UPDATE_DOC_IMAGES"):  # refresh the images docs/console.md shows
        docs.mkdir(parents=True, exist_ok=True)
        for png in ARTIFACTS.glob("*.png"):
            shutil.copy(png, docs / f"console-{png.name}")
