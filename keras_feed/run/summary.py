"""The closing table of a run: teachers, ensemble, CE student, FEED student, gain.

`rows(metrics)` turns a run's `metrics.json` into `(label, top-1 accuracy)`
rows; `table(metrics)` prints them for the console and `plot(metrics, path)`
draws them as a PNG bar chart.
"""

from keras_feed.run import files


def _entries(metrics):
    """`[(label, scores)]`: every model a run's metrics report, with its scores."""
    result = [
        (f"teacher {index} ({teacher['model']})", teacher)
        for index, teacher in enumerate(metrics.get("teachers", []))
    ]
    if "ensemble" in metrics:
        result.append((f"ensemble of {metrics['ensemble']['size']} teachers", metrics["ensemble"]))
    if "baseline" in metrics:
        result.append((f"CE student ({metrics['baseline']['model']}, same seed)", metrics["baseline"]))
    method = metrics.get("method", "student")
    result.append((f"{method} student ({metrics['student']['model']})", metrics["student"]))
    return result


def rows(metrics):
    """`[(label, test accuracy)]` for every model a run's metrics report."""
    return [(label, scores["test_accuracy"]) for label, scores in _entries(metrics)]


def table(metrics):
    """The rows as printable lines, with the gain over the CE student when known.

    A run with a validation split shows each model's validation accuracy too.
    """
    entries = _entries(metrics)
    width = max(len(label) for label, _ in entries)
    validation = all("validation_accuracy" in scores for _, scores in entries)
    lines = []
    for label, scores in entries:
        line = f"  {label:<{width}}  {100 * scores['test_accuracy']:6.2f} %"
        if validation:
            line += f"   {100 * scores['validation_accuracy']:6.2f} %"
        lines.append(line)
    if "gain" in metrics:
        line = f"  {'gain over the CE student':<{width}}  {100 * metrics['gain']:+6.2f} points"
        if validation and "validation_gain" in metrics:
            line += f" {100 * metrics['validation_gain']:+6.2f} points"
        lines.append(line)
    return ["Test accuracy, then validation accuracy:" if validation else "Test accuracy:"] + lines


def plot(metrics, path):
    """A horizontal bar chart of the rows, written atomically to `path` (PNG)."""
    import matplotlib  # noqa: PLC0415 (only for the picture)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    entries = rows(metrics)
    labels = [label for label, _ in entries]
    values = [100 * accuracy for _, accuracy in entries]
    figure, axis = plt.subplots(figsize=(7, 0.5 * len(entries) + 1.5))
    colours = ["#9aa9b8"] * len(entries)
    colours[-1] = "#d2691e"
    if "baseline" in metrics:
        colours[-2] = "#5b7fa3"
    bars = axis.barh(range(len(entries)), values, color=colours)
    axis.set_yticks(range(len(entries)))
    axis.set_yticklabels(labels)
    axis.invert_yaxis()
    low = min(values)
    axis.set_xlim(max(0.0, low - 5.0), min(100.0, max(values) + 2.0))
    for bar, value in zip(bars, values):
        axis.text(value, bar.get_y() + bar.get_height() / 2, f" {value:.2f}", va="center")
    title = f"{metrics.get('dataset', '')}: test accuracy (%)"
    if "gain" in metrics:
        title += f"\ngain over the CE student: {100 * metrics['gain']:+.2f} points"
    axis.set_title(title, fontsize=10)
    figure.tight_layout()
    with files.atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)
