"""Accuracy metric for `evaluate`, shipped with the package so it loads offline by path.

Same definition and output as the Hub's `evaluate-metric/accuracy`: the (optionally weighted) fraction of
predictions equal to their references. Load it with `evaluate.load(<path to this folder>)`.
"""

import datasets
import evaluate

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among the total number of cases processed:
Accuracy = (TP + TN) / (TP + TN + FP + FN). For a language model it is next-token accuracy: the share of positions
where the most likely next token is the reference token.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels.
    references (`list` of `int`): Ground truth labels.
    normalize (`boolean`): If `False`, return the number of correct predictions instead of the fraction. Defaults to `True`.
    sample_weight (`list` of `float`): Sample weights. Defaults to `None`.
Returns:
    accuracy (`float` or `int`): Accuracy score; between 0 and 1 when normalized.
Examples:
    >>> accuracy_metric = evaluate.load("modeling_moe/metrics/accuracy")
    >>> accuracy_metric.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and Grisel, O. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
                if self.config_name == "multilabel"
                else {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/accuracy"],
        )

    def _compute(
        self,
        predictions: list[int],
        references: list[int],
        normalize: bool = True,
        sample_weight: list[float] | None = None,
    ) -> dict[str, float | int]:
        # Plain-Python counting keeps the module free of a scikit-learn dependency.
        if len(predictions) != len(references):
            raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
        weights = sample_weight if sample_weight is not None else [1.0] * len(predictions)
        correct = sum(w for p, r, w in zip(predictions, references, weights, strict=True) if p == r)
        if not normalize:
            return {"accuracy": correct if sample_weight is not None else int(correct)}
        total = sum(weights)
        return {"accuracy": float(correct / total) if total else 0.0}
