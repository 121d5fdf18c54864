"""The pipeline's report: tables (accuracy per stage, pseudo-label iterations, wall time) and plots."""
from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from data import atomic  # noqa: E402
from data.datasets import load_image, read_classes, read_split  # noqa: E402
from data.transforms import evaluate as eval_transform  # noqa: E402
from trainer.runtime import keep, rundir, stages, tracking  # noqa: E402
from trainer.runtime.models import build_backbone, load_backbone_weights, load_classifier, residual_stages  # noqa: E402
from trainer.runtime.predict import SHARDS, whole_top_k  # noqa: E402

# the ablation table's rows that score no step's model (each model step declares its own row: stages.RECIPE)
EVALUATION_ROWS = {"knn": "Barlow Twins features, kNN on the {labels} labels", "tta": "+ multi-scale TTA"}


def _json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _events(run_dir):
    path = os.path.join(run_dir, rundir.METRICS)
    return rundir.read_lines(path) if os.path.exists(path) else []


def _row_names(run_dir: str, model_rows: dict) -> dict:
    """Each row's name with the run's own counts ({labels}: the labeled images the run started with;
    {queries}: the answers active learning added)."""
    labels = len(read_split(_data_root(run_dir), "labeled"))
    answers = _json(os.path.join(run_dir, "active", "answers_summary.json"))
    queries = answers["answered"] if answers else "–"
    return {stage: name.format(labels=labels, queries=queries) for stage, name in {**model_rows, **EVALUATION_ROWS}.items()}


def accuracy_table(run_dir: str, model_rows: dict) -> list[dict]:
    """Table 2: val/test top-1 after each stage (single scale), then the final model with TTA."""
    rows, names = [], _row_names(run_dir, model_rows)
    knn = _json(os.path.join(run_dir, "evaluate_knn", "eval.json"))
    final = None
    for stage in model_rows:
        result = _json(os.path.join(run_dir, f"evaluate_{stage}", "eval.json"))
        if stage == "finetune" and knn:
            rows.append({"stage": "knn", "name": names["knn"], **{s: knn["knn"][s] for s in ("val", "test")}})
        if result:
            splits = result["splits"]
            first = next(iter(splits["val"]["scales"]))   # the first of evaluate.scales: the training size
            kept = keep.read(os.path.join(run_dir, stage))   # a stage that takes a classifier in
            rows.append({"stage": stage, "name": names[stage],
                         **{s: splits[s]["scales"][first]["top1"] for s in ("val", "test") if s in splits},
                         **({"kept": kept} if kept else {})})
            if stage != "supervised":
                final = splits
    if final:
        rows.append({"stage": "tta", "name": names["tta"], **{s: final[s]["tta"]["top1"] for s in ("val", "test")}})
    return rows


def baseline_rows(run_dir: str, baselines: dict, stage_seconds: dict) -> list[dict]:
    """Each baseline's row (stages.BASELINES), scored as the recipe's final model is: with the TTA views its
    evaluation chose on val; {minutes}: the wall minutes it and its evaluation took."""
    rows = []
    for stage, name in baselines.items():
        result = _json(os.path.join(run_dir, f"evaluate_{stage}", "eval.json"))
        if result:
            minutes = sum(stage_seconds.get(s, 0.0) for s in (stage, f"evaluate_{stage}")) / 60
            kept = keep.read(os.path.join(run_dir, stage))   # a run none of whose epochs beat its start
            rows.append({"stage": stage, "name": name.format(minutes=f"{minutes:.1f}"), "baseline": True,
                         "minutes": minutes,
                         **{s: result["splits"][s]["tta"]["top1"] for s in ("val", "test") if s in result["splits"]},
                         **({"kept": kept} if kept else {})})
    return rows


def versus_baselines(accuracy: list[dict], recipe_minutes: float) -> list[dict]:
    """The recipe's final model (its TTA row) less each baseline, in top-1 on val and test."""
    final = next((r for r in accuracy if r["stage"] == "tta"), None)
    return [{"baseline": b["stage"], "name": b["name"].split(" (")[0], "recipe_minutes": recipe_minutes,
             "baseline_minutes": b["minutes"], **{s: final[s] - b[s] for s in ("val", "test") if s in final and s in b}}
            for b in accuracy if b.get("baseline") and final]


def val_drops(accuracy: list[dict]) -> list[tuple[dict, dict]]:
    """(previous, stage) pairs of the recipe's chain (the supervised and other baselines aside) where val fell."""
    chain = [r for r in accuracy if r["stage"] != "supervised" and not r.get("baseline") and r.get("val") is not None]
    return [(a, b) for a, b in zip(chain, chain[1:]) if b["val"] < a["val"]]


def iteration_table(run_dir: str) -> list[dict]:
    """Table 4: per pseudo-label iteration, P, pseudo-labels, duplicates, precision, val top-1."""
    selection = _json(os.path.join(run_dir, "pseudolabel", "selection.json"))
    return selection["iterations"] if selection else []


def _stage_text(row: dict) -> str:
    """A row's name, with the note of a stage that kept its input because its own result was worse."""
    note = keep.note(row.get("kept"))
    return f"{row['name']} ({note})" if note else row["name"]


def _fmt(x, pct=True):
    if x is None:
        return "–"
    return f"{100 * x:.2f}" if pct else f"{x}"


def _difference_line(versus: dict, recipe_timed: list[str]) -> str:
    points = {s: f"{100 * versus[s]:+.2f}" if s in versus else "–" for s in ("val", "test")}
    return (f"recipe − {versus['name']}: {points['test']} test ({points['val']} val) at equal minutes: the recipe's "
            f"{versus['recipe_minutes']:.1f} ({', '.join(recipe_timed)}; not the supervised reference, the other "
            f"evaluations or predict), {versus['name']}'s {versus['baseline_minutes']:.1f} (its training and "
            "evaluation).")


def write(run_dir: str, stage_seconds: dict, steps: list, recipe_timed: list[str] = ()):
    """report.md/.json and plots of a pipeline run; `steps`: the pipeline's steps in recipe order, then its
    baselines' (trainer.runtime.stages.Step); those with a row produce a classifier, scored in evaluate_<step>.
    `recipe_timed`: the steps whose wall seconds are the recipe's minutes (stages.recipe_timed_steps)."""
    model_rows = {s.name: s.row for s in steps if s.row and s.name not in stages.BASELINES}
    accuracy, iterations = accuracy_table(run_dir, model_rows), iteration_table(run_dir)
    accuracy += baseline_rows(run_dir, {s.name: s.row for s in steps if s.name in stages.BASELINES}, stage_seconds)
    versus = versus_baselines(accuracy, sum(stage_seconds.get(s, 0.0) for s in recipe_timed) / 60)
    differences = [_difference_line(v, recipe_timed) for v in versus]
    plots = [p for p in (plot_ablation(run_dir, accuracy), plot_curves(run_dir, [s.name for s in steps]),
                         plot_precision(run_dir),
                         plot_top_images(run_dir), plot_feature_maps(run_dir, list(model_rows))) if p]
    tracking.log_images(run_dir, plots)   # run.log=[..., tensorboard]: beside the stages' curves
    lines = ["# semiscale run report", "", f"Run dir: `{os.path.abspath(run_dir)}`", "", data_line(run_dir),
             *open_set_lines(run_dir, iterations), "",
             "## Accuracy after each stage (top-1 %)", "", "| stage | val | test |", "|---|---|---|"]
    lines += [f"| {_stage_text(r)} | {_fmt(r.get('val'))} | {_fmt(r.get('test'))} |" for r in accuracy]
    drops = val_drops(accuracy)
    lines += ["", "Every stage at least as good as the one before it on val: " + (
        "no; " + "; ".join(f"{b['name']} {_fmt(b['val'])} < {_fmt(a['val'])}" for a, b in drops) if drops
        else "yes") + ".", *differences, "Model selection uses val only; test is reported, never used to choose.", "",
              "## Pseudo-label iterations", "",
              "| iteration | P | pseudo-labels | images chosen for >1 class | precision % | val top-1 % |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['iteration']} | {r.get('p', '–')} | {r.get('selected', '–')} | {r.get('duplicates', '–')} | "
              f"{_fmt(r.get('precision'))} | {_fmt(r['val_top1'])} |" for r in iterations]
    lines += ["", "Iteration 0 is the fine-tuned model the iterations start from; precision is measured "
              "against the hidden labels of the unlabeled set.", "", "## Wall time per stage", "",
              "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in stage_seconds.items()]
    lines += [f"| total | {sum(stage_seconds.values()):.0f} |", "", "## Plots", ""]
    lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    atomic.write_text(os.path.join(run_dir, "report.md"), "\n".join(lines) + "\n")
    atomic.write_json(os.path.join(run_dir, "report.json"),
                      {"accuracy": accuracy, "val_drops": [b["stage"] for _, b in drops], "iterations": iterations,
                       "stage_seconds": stage_seconds, "versus_baselines": versus,
                       "plots": [os.path.basename(p) for p in plots]})
    # the table, the verdict line and the baselines' differences
    print("\n".join(lines[4:4 + 6 + len(accuracy) + len(differences)]), flush=True)


def data_line(run_dir) -> str:
    """The dataset a run used and, for a pile `prepare` shaped (prepare.json's variant), how."""
    root = _data_root(run_dir)
    variant = ((_json(os.path.join(root, "prepare.json")) or {}).get("params") or {}).get("variant")
    shaped = "; pile shaped by prepare: " + "; ".join(
        f"{k.replace('_', ' ')} {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in variant.items()
    ) if variant else ""
    return f"Data: `{root}`{shaped}."


def open_set_lines(run_dir, iterations) -> list[str]:
    """Where the unlabeled pile holds images of classes outside the class list (an open-set simulation): how
    many of the pseudo-labels and of active learning's queries landed on them."""
    fixmatch = (_json(os.path.join(run_dir, "pseudolabel", "selection.json")) or {}).get("fixmatch_selection") or {}
    answers = _json(os.path.join(run_dir, "active", "answers_summary.json")) or {}
    landed = [f"iteration {r['iteration']}: {r['outside_classes']} of {r['selected']} pseudo-labels"
              for r in iterations if "outside_classes" in r]
    if "outside_classes" in fixmatch:
        landed.append(f"FixMatch's selection: {fixmatch['outside_classes']} of {fixmatch['selected']}")
    if "outside_classes" in answers:
        landed.append(f"active learning: {answers['outside_classes']} of {answers['queries']} queries")
    return ["", "Landed on images of classes outside the class list: " + "; ".join(landed) + "."] if landed else []


# ---- plots ----

def plot_ablation(run_dir, accuracy):
    if not accuracy:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(accuracy) + 1.5))
    names = [_stage_text(r) for r in accuracy][::-1]
    test = [100 * (r.get("test") or 0) for r in accuracy][::-1]
    bars = ax.barh(names, test, color="#4c72b0")
    for bar, value in zip(bars, test):
        ax.text(value + 0.3, bar.get_y() + bar.get_height() / 2, f"{value:.1f}", va="center")
    ax.set_xlabel("test top-1 (%)")
    ax.set_xlim(min(test) - 10 if test else 0, 100)
    ax.set_title("Accuracy after each stage")
    fig.tight_layout()   # room for the stage names
    return _save(fig, run_dir, "ablation.png")


def plot_curves(run_dir, step_names):
    """Loss and val curves of every step that trained (logged a loss)."""
    panels = []
    for stage in step_names:
        events = _events(os.path.join(run_dir, stage))
        events = [e for e in events if "step" in e]   # a training loop's (pseudolabel logs per iteration)
        loss = [(e["step"], e["loss"]) for e in events if "loss" in e]
        val = {k: [(e["step"], e[k]) for e in events if k in e and "event" not in e]
               for k in ("val_top1", "val_top1_ema", "knn_top1")}
        val = {k: points for k, points in val.items() if points}
        if loss:
            panels.append((stage, loss, val))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (stage, loss, val) in zip(axes[0], panels):
        ax.plot(*zip(*loss), color="#4c72b0", lw=1)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss", color="#4c72b0")
        if val:
            twin = ax.twinx()
            for (key, points), colour in zip(val.items(), ("#dd8452", "#55a868", "#c44e52")):
                twin.plot(*zip(*sorted(points)), "o-", color=colour, ms=3, label=key)
            twin.set_ylabel("val / kNN top-1", color="#dd8452")
            twin.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return _save(fig, run_dir, "training_curves.png")


def plot_precision(run_dir):
    iterations = [r for r in iteration_table(run_dir) if r["iteration"] > 0]
    sel = [_json(os.path.join(run_dir, "pseudolabel", f"iter{r['iteration']}", "selection.json")) for r in iterations]
    sel = [s for s in sel if s and s.get("class_precision")]
    if not sel:
        return None
    classes = read_classes(_data_root(run_dir))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(classes)), 3.8))
    width = 0.8 / len(sel)
    for j, s in enumerate(sel):
        values = [100 * (v or 0) for v in s["class_precision"]]
        ax.bar(np.arange(len(values)) + j * width, values, width, label=f"P={s['p']}")
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=45, ha="right")
    ax.set_ylabel("pseudo-label precision (%)")
    ax.legend(fontsize=8)
    ax.set_title("Per-class pseudo-label precision per iteration")
    fig.tight_layout()
    return _save(fig, run_dir, "pseudo_label_precision.png")


def plot_top_images(run_dir, per_class: int = 8, classes_shown: int = 3):
    """Fig. 2 style: the most confident unlabeled images of the best and worst classes (by precision)."""
    pred = os.path.join(run_dir, "pseudolabel", "predictions")
    if not os.path.exists(os.path.join(pred, SHARDS)):
        return None
    root = _data_root(run_dir)
    unlabeled, names = read_split(root, "unlabeled"), read_classes(root)
    label, prob = (top[:, 0] for top in whole_top_k(pred))
    top = {c: np.where(label == c)[0][np.argsort(-prob[label == c], kind="stable")[:per_class]] for c in range(len(names))}
    if unlabeled.hidden_labels is not None:
        precision = {c: float((unlabeled.hidden_labels[i] == c).mean()) if len(i) else 0 for c, i in top.items()}
    else:
        precision = {c: float(prob[i].mean()) if len(i) else 0 for c, i in top.items()}
    order = sorted(top, key=lambda c: -precision[c])
    shown = order[:classes_shown] + [c for c in order[-classes_shown:] if c not in order[:classes_shown]]
    fig, axes = plt.subplots(len(shown), per_class, figsize=(1.3 * per_class, 1.5 * len(shown)), squeeze=False)
    for row, c in zip(axes, shown):
        for j, ax in enumerate(row):
            ax.axis("off")
            if j >= len(top[c]):
                continue
            i = top[c][j]
            ax.imshow(load_image(unlabeled.paths[i]))
            if unlabeled.hidden_labels is not None:
                ok = unlabeled.hidden_labels[i] == c
                ax.add_patch(plt.Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, lw=3,
                                           color="#2ca02c" if ok else "#d62728"))
            ax.set_title(f"{prob[i]:.2f}", fontsize=7)
        row[0].text(-0.15, 0.5, f"{names[c]}\n{100 * precision[c]:.0f}%", transform=row[0].transAxes,
                    ha="right", va="center", fontsize=8)
    fig.suptitle("Most confident unlabeled images per class: best and worst classes (green = correct)")
    fig.tight_layout()
    return _save(fig, run_dir, "top_images.png")


@torch.no_grad()
def plot_feature_maps(run_dir, model_stages):
    """Fig. 1 style: one test image's mean activation at every residual stage, for every stage's model."""
    backbones = []
    pretrain = os.path.join(run_dir, "pretrain", "backbone.pt")
    config_path = os.path.join(run_dir, "pretrain", "config.yaml")
    if os.path.exists(pretrain) and os.path.exists(config_path):
        with open(config_path) as f:
            m = yaml.safe_load(f)["model"]
        backbone = build_backbone(m["backbone"], m["small_stem"], m["width"])
        load_backbone_weights(backbone, pretrain)
        backbones.append(("pretrain", backbone))
    for stage in model_stages:
        path = os.path.join(run_dir, stage, "model.pt")
        if os.path.exists(path):
            backbones.append((stage, load_classifier(path)[0].backbone))
    if not backbones:
        return None
    root = _data_root(run_dir)
    image = load_image(read_split(root, "test").paths[0])
    x = eval_transform(image.size[0])(image)[None]
    layers = residual_stages(backbones[0][1])
    fig, axes = plt.subplots(len(backbones), len(layers) + 1, figsize=(2 * (len(layers) + 1), 2 * len(backbones)),
                             squeeze=False)
    for row, (stage, backbone) in zip(axes, backbones):
        maps = {}
        hooks = [getattr(backbone, n).register_forward_hook(lambda m, i, o, n=n: maps.__setitem__(n, o))
                 for n in layers]
        backbone.eval()(x)
        for h in hooks:
            h.remove()
        row[0].imshow(image)
        row[0].set_ylabel(stage, fontsize=9)
        for ax, name in zip(row[1:], layers):
            ax.imshow(maps[name][0].mean(0).numpy(), cmap="magma")
            ax.set_title(name, fontsize=8)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Mean feature map per residual stage, per stage's model")
    fig.tight_layout()
    return _save(fig, run_dir, "feature_maps.png")


def _data_root(run_dir):
    with open(os.path.join(run_dir, "config.yaml")) as f:
        return yaml.safe_load(f)["data"]["root"]


def _save(fig, run_dir, name):
    path = os.path.join(run_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
