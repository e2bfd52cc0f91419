"""The demo page: a Gradio ``Blocks`` over :class:`gamma.demo.service.DemoService`, and a plain ``POST /score`` route.

Tabs: **Score** (one or many images: score, mapped MOS, level distribution, attributes, scene; precision selectable),
**Rank** (a gallery best to worst and a CSV), **Adapt** (image-score pairs -> fit report -> new images scored under that
requirement) and **Experts** (router weights per MoAE block and expert as a heat map). Endpoints: the Gradio API
``score`` (``/gradio_api/call/score``) and ``POST /score`` (multipart field ``file``), both returning the JSON of
:meth:`DemoService.score_bytes`. Gradio and FastAPI are imported here, and this module only when ``gamma demo`` runs.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..archs.precision import PRECISIONS
from .service import DemoInputError, DemoService

logger = logging.getLogger(__name__)

#: Requests one worker runs at a time per event; more wait in the queue (``--concurrency``).
DEFAULT_CONCURRENCY = 1
#: Queued requests beyond which new ones are refused at once (gradio says the queue is full).
DEFAULT_QUEUE_SIZE = 64
#: Images in one Score / Rank / Adapt request.
MAX_FILES = 200


def _read_upload(path: Any, service: DemoService) -> tuple[str, bytes]:
    """(file name, contents) of a file gradio received; the path is gradio's own upload cache, never a visitor's."""
    path = os.fspath(getattr(path, "name", path))
    size = os.path.getsize(path)
    name = os.path.basename(path)
    if size > service.max_upload_bytes:
        raise DemoInputError(f"{name}: the file is {size / 2**20:.1f} MB; the demo accepts at most "
                             f"{service.max_upload_bytes / 2**20:.0f} MB")
    return name, Path(path).read_bytes()


def _uploads(files: Any, service: DemoService) -> list[tuple[str, bytes]]:
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files or [])
    if not files:
        raise DemoInputError("upload an image first")
    if len(files) > MAX_FILES:
        raise DemoInputError(f"{len(files)} files: the demo scores at most {MAX_FILES} per request")
    return [_read_upload(f, service) for f in files]


def _mos_range(lo: Any, hi: Any) -> tuple[float, float] | None:
    if lo in (None, "") or hi in (None, "") or float(lo) == float(hi):
        return None
    return float(lo), float(hi)


def _precision(choice: str | None) -> str | None:
    return None if choice in (None, "", "stored") else choice


def _table(rows: list[dict[str, Any]]) -> Any:
    import pandas as pd

    flat = []
    for r in rows:
        row = {"name": r["name"], "score": r.get("score"), **({"mos": r["mos"]} if "mos" in r else {})}
        row.update(r.get("attributes", {}))
        if "scene" in r:
            row["scene"] = r["scene"]
        row["error"] = r.get("error", "")
        flat.append(row)
    return pd.DataFrame(flat)


def build_blocks(service: DemoService, *, concurrency: int = DEFAULT_CONCURRENCY) -> Any:
    """The page's :class:`gradio.Blocks` (queue not yet configured)."""
    import gradio as gr

    from ..plots import distribution_figure, routing_heatmap_figure

    ready = service.weights is not None
    header = service.describe()
    scenes = service.scenes if ready else []

    def score_tab(files: Any, scene: str, precision: str, lo: Any, hi: Any) -> tuple[Any, ...]:
        try:
            uploads = _uploads(files, service)
            rows = service.score_many(uploads, scene=scene or None, precision=_precision(precision),
                                      mos_range=_mos_range(lo, hi), skip_errors=True)
        except DemoInputError as exc:
            return "", f"**Error:** {exc}", None, None, {"error": str(exc)}
        first = rows[0]
        errors = [r["error"] for r in rows if "error" in r]
        message = "\n\n".join(f"**Error:** {e}" for e in errors) or f"Scored {len(rows)} image(s)."
        shown = f"{first['score']:.6f}" if "score" in first else ""
        if "mos" in first:
            shown += f"  (MOS {first['mos']:.3f})"
        dist = distribution_figure(first["distribution"], first["name"]) if "distribution" in first else None
        return shown, message, dist, _table(rows), rows[0] if len(rows) == 1 else rows

    def api_score(file: Any) -> dict[str, Any]:
        """One image file -> {score, distribution, std, attributes, scene ...} with default settings."""
        try:
            name, data = _read_upload(file, service) if file else ("", b"")
            if not file:
                raise DemoInputError("no file given")
            return service.score_bytes(data, name)
        except DemoInputError as exc:
            raise gr.Error(str(exc)) from None

    def rank_tab(files: Any, scene: str) -> tuple[Any, ...]:
        try:
            uploads = _uploads(files, service)
            rows = service.score_many(uploads, scene=scene or None, skip_errors=True)
        except DemoInputError as exc:
            return [], None, None, f"**Error:** {exc}"
        paths = {os.path.basename(os.fspath(getattr(f, "name", f))): os.fspath(getattr(f, "name", f))
                 for f in ([files] if isinstance(files, str) else files)}
        good = sorted((r for r in rows if "score" in r), key=lambda r: -r["score"])
        gallery = [(paths[r["name"]], f"{i + 1}. {r['name']}  {r['score']:.4f}") for i, r in enumerate(good)]
        out = Path(tempfile.mkdtemp(prefix="gamma_rank_")) / "ranking.csv"
        with open(out, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["rank", "name", "score", "error"])
            for i, r in enumerate(good):
                writer.writerow([i + 1, r["name"], f"{r['score']:.6f}", ""])
            for r in rows:
                if "error" in r:
                    writer.writerow(["", r["name"], "", r["error"]])
        errors = [r["error"] for r in rows if "error" in r]
        message = "\n\n".join(f"**Error:** {e}" for e in errors) or f"Ranked {len(good)} image(s), best first."
        return gallery, _table(good), str(out), message

    def adapt_tab(pair_files: Any, scores_text: str, csv_file: Any, targets: Any, scene: str) -> tuple[Any, ...]:
        try:
            uploads = _uploads(pair_files, service)
            scores = _parse_scores(scores_text, csv_file, [n for n, _ in uploads], service)
            pairs = [(n, d, scores[n]) for n, d in uploads]
            report, rows = service.adapt(pairs, _uploads(targets, service) if targets else [], scene=scene or None)
        except (DemoInputError, ValueError) as exc:
            return f"**Error:** {exc}", None
        return _report_markdown(report), _table_adapted(rows)

    def experts_tab(file: Any, scene: str) -> tuple[Any, ...]:
        try:
            name, data = _uploads(file, service)[0]
            weights, labels = service.routing(data, name, scene=scene or None)
        except DemoInputError as exc:
            return None, f"**Error:** {exc}"
        fig = routing_heatmap_figure(weights, labels, title=f"router weights: {name}")
        return fig, f"Mean router weight over every token of {name}; each row sums to 1."

    with gr.Blocks(title="gamma demo") as blocks:
        gr.Markdown(f"# gamma: image quality and aesthetics\n**Model:** {header}", elem_id="model-line")
        if not ready:
            gr.Markdown(f"## No weights found\n{service.missing}\n\nStart the page with "
                        "`gamma demo --weights FILE`.", elem_id="no-weights")
        scene_choices = [""] + scenes
        with gr.Tab("Score"):
            with gr.Row():
                with gr.Column():
                    files = gr.File(label="images", file_count="multiple", type="filepath", elem_id="score-files")
                    with gr.Row():
                        scene = gr.Dropdown(scene_choices, value="", label="scene (SDP models; empty: auto)",
                                            visible=bool(scenes))
                        precision = gr.Dropdown(["stored", *PRECISIONS], value="stored", label="precision")
                    with gr.Row():
                        lo = gr.Number(label="MOS range: low (optional; equal values: none)", value=None)
                        hi = gr.Number(label="MOS range: high", value=None)
                    go = gr.Button("Score", variant="primary", elem_id="score-button")
                with gr.Column():
                    shown = gr.Textbox(label="score (first image)", elem_id="score-value", interactive=False)
                    message = gr.Markdown(elem_id="score-message")
                    dist = gr.Plot(label="level distribution (first image)")
                    table = gr.Dataframe(label="scores (attributes: higher is better)", interactive=False)
                    json_out = gr.JSON(label="JSON")
            go.click(score_tab, [files, scene, precision, lo, hi], [shown, message, dist, table, json_out],
                     api_name="score_page")
            api_in = gr.File(visible=False, type="filepath")
            api_out = gr.JSON(visible=False)
            api_button = gr.Button(visible=False)
            api_button.click(api_score, api_in, api_out, api_name="score")
        with gr.Tab("Rank"):
            rank_files = gr.File(label="images", file_count="multiple", type="filepath")
            rank_scene = gr.Dropdown(scene_choices, value="", label="scene", visible=bool(scenes))
            rank_go = gr.Button("Rank", variant="primary")
            rank_message = gr.Markdown()
            gallery = gr.Gallery(label="best to worst", columns=5, height="auto")
            rank_table = gr.Dataframe(interactive=False)
            rank_csv = gr.File(label="ranking.csv")
            rank_go.click(rank_tab, [rank_files, rank_scene], [gallery, rank_table, rank_csv, rank_message],
                          api_name="rank")
        with gr.Tab("Adapt"):
            gr.Markdown("Upload about 10 images with the scores you want (any scale), as `name, score` lines or a "
                        "CSV `image,score`; then images to score under that requirement. Gamma: a monotone map of its "
                        "score (`Scorer.adapt`); PromptIQA: the pairs are its prompt.")
            with gr.Row():
                pair_files = gr.File(label="example images", file_count="multiple", type="filepath")
                with gr.Column():
                    scores_text = gr.Textbox(label="scores: one `name, score` per line", lines=8)
                    scores_csv = gr.File(label="or a CSV image,score", type="filepath")
            targets = gr.File(label="images to score", file_count="multiple", type="filepath")
            adapt_scene = gr.Dropdown(scene_choices, value="", label="scene", visible=bool(scenes))
            adapt_go = gr.Button("Fit and score", variant="primary")
            fit_report = gr.Markdown()
            adapted = gr.Dataframe(interactive=False)
            adapt_go.click(adapt_tab, [pair_files, scores_text, scores_csv, targets, adapt_scene],
                           [fit_report, adapted], api_name="adapt")
        with gr.Tab("Experts"):
            expert_file = gr.File(label="one image", type="filepath")
            expert_scene = gr.Dropdown(scene_choices, value="", label="scene", visible=bool(scenes))
            expert_go = gr.Button("Show routing", variant="primary")
            heat = gr.Plot(label="router weight per block and expert")
            expert_message = gr.Markdown()
            expert_go.click(experts_tab, [expert_file, expert_scene], [heat, expert_message], api_name="experts")
    blocks.queue(default_concurrency_limit=concurrency, max_size=DEFAULT_QUEUE_SIZE)
    return blocks


def _parse_scores(text: str, csv_file: Any, names: Sequence[str], service: DemoService) -> dict[str, float]:
    """``name, score`` lines (or a CSV ``image,score``) -> {name: score} for every uploaded name."""
    if csv_file:
        text = _read_upload(csv_file, service)[1].decode("utf-8", errors="replace")
    scores: dict[str, float] = {}
    for row in csv.reader(io.StringIO(text or "")):
        if len(row) < 2 or not row[0].strip():
            continue
        key = os.path.basename(row[0].strip())
        try:
            scores[key] = float(row[1])
        except ValueError:
            if scores:  # only a header may be non-numeric
                raise DemoInputError(f"the score of {key!r} is not a number: {row[1]!r}") from None
    if len(scores) == len(names) and not set(names) <= set(scores):  # plain scores in upload order
        scores = dict(zip(names, scores.values(), strict=True))
    missing = [n for n in names if n not in scores]
    if missing:
        raise DemoInputError(f"no score for {', '.join(missing)}: give one `name, score` line per example image")
    return scores


def _report_markdown(report: dict[str, Any]) -> str:
    if report.get("model") == "promptiqa":
        return f"PromptIQA prompt set from {report['pairs']} pairs; the images below are scored relative to it."
    lines = [f"**Fit report** ({report['method']} map of {', '.join(report['features'])}, {report['pairs']} pairs)",
             "", "| | SRCC | PLCC | RMSE |", "|---|---|---|---|",
             f"| in-sample | {report['srcc']:.3f} | {report['plcc']:.3f} | {report['rmse']:.4g} |",
             f"| leave-one-out | {report['loo_srcc']:.3f} | {report['loo_plcc']:.3f} | {report['loo_rmse']:.4g} |"]
    lines += [f"\n_{note}_" for note in report.get("notes", [])]
    return "\n".join(lines)


def _table_adapted(rows: list[dict[str, Any]]) -> Any:
    import pandas as pd

    return pd.DataFrame(rows)


def build_app(service: DemoService, *, concurrency: int = DEFAULT_CONCURRENCY) -> Any:
    """A FastAPI app: ``POST /score`` (multipart ``file``) and the page at ``/``."""
    import gradio as gr
    from fastapi import FastAPI
    from starlette.datastructures import UploadFile
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    app = FastAPI(title="gamma demo")
    limit = service.max_upload_bytes

    async def score(request: Request) -> JSONResponse:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit + 65536:
            return JSONResponse({"error": f"upload too large: at most {limit / 2**20:.0f} MB"}, status_code=413)
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            return JSONResponse({"error": "send one image as the multipart field 'file'"}, status_code=400)
        data = await upload.read(limit + 1)
        name = os.path.basename(upload.filename or "upload")
        try:
            result = await _in_thread(service.score_bytes, service.check_upload(data, name), name)
        except DemoInputError as exc:
            return JSONResponse({"error": str(exc)}, status_code=413 if len(data) > limit else 422)
        return JSONResponse(result)

    app.router.add_route("/score", score, methods=["POST"])  # a plain Starlette route: the request as is
    blocks = build_blocks(service, concurrency=concurrency)
    app = gr.mount_gradio_app(app, blocks, path="/", max_file_size=limit, footer_links=["api"])
    # Gradio checks that a file named in a request was uploaded (is in its upload folder) only once the Blocks count
    # as launched, which mount_gradio_app does not set (gradio 6.31): without this, an API call naming a file in the
    # server's working or temp folder would have gradio copy it and serve it back. tests/test_demo_page.py checks it.
    blocks.has_launched = True
    return app


_SCORE_SEMAPHORE: Any = None


async def _in_thread(fn: Any, *args: Any) -> Any:
    """Run ``fn`` in a worker thread, at most one at a time (the route shares the model with the page)."""
    import asyncio

    global _SCORE_SEMAPHORE
    if _SCORE_SEMAPHORE is None:
        _SCORE_SEMAPHORE = asyncio.Semaphore(DEFAULT_CONCURRENCY)
    async with _SCORE_SEMAPHORE:
        return await asyncio.to_thread(fn, *args)


class DemoServer:
    """The app served by uvicorn in a background thread (tests, screenshots): ``with DemoServer(...) as url: ...``."""

    def __init__(self, service: DemoService, host: str = "127.0.0.1", port: int = 0,
                 concurrency: int = DEFAULT_CONCURRENCY) -> None:
        import uvicorn

        self.host = host
        self.port = port or _free_port(host)
        self.app = build_app(service, concurrency=concurrency)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=self.port, log_level="warning"))
        self.thread: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> str:
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the demo server did not start on {self.url}")
            time.sleep(0.05)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
