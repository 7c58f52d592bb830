"""`ensemble_probabilities`: members on different base models (families, vocabulary sizes), each with its own
template and label words, averaged over the raw labels; one base model in memory at a time."""

import gc
import weakref

import pytest

import softprompt
from softprompt.data import Template, load_rows
from softprompt.errors import ConfigError
from softprompt.training import label_probabilities, train
from softprompt.training.ensemble import EnsembleMember, ensemble_probabilities, predict_ensemble_file

from tiny import VOCAB, save_tiny_checkpoint, tiny_base, tiny_tokenizer
from toy_data import TRAINING, toy_job, toy_rows, write_csv

pytestmark = pytest.mark.usefixtures("one_thread")

# the label words' order differs from member to member: the ensemble must line them up by raw label
SETUPS = {
    "bloom": {"template": "{text} =", "verbalizer": {"A": " x", "B": " y"}},
    "llama": {"template": "Text: {text}\nLabel:", "verbalizer": {"B": " no", "A": " yes"}},
}


def save_checkpoint(family: str, path, extra_vocab: int = 0) -> str:
    if not extra_vocab:
        return save_tiny_checkpoint(family, path)
    base = tiny_base(family)
    base.resize_token_embeddings(VOCAB + extra_vocab)  # another vocabulary size than the other member's
    base.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ensemble")
    data = write_csv(tmp / "train.csv", toy_rows(16))
    out = []
    for family, extra in (("bloom", 0), ("llama", 5)):
        model_dir = save_checkpoint(family, tmp / family, extra)
        job = toy_job(data, tmp / f"runs-{family}", {**TRAINING, **SETUPS[family]}, model=model_dir)
        result = train(job, progress=False)
        out.append(EnsembleMember(model_dir, str(result.adapters["default"].path)))
    rows = [{"ID": f"r{i}", "text": r["text"]} for i, r in enumerate(toy_rows(6, seed=5))]
    return tmp, out, rows


def flat(probs: list[list[float]]) -> list[float]:
    return [p for row in probs for p in row]


def alone(member: EnsembleMember, family: str, rows) -> list[list[float]]:
    """One member's probabilities computed on its own, in raw label order A, B."""
    model = softprompt.load(member.model)
    model.load_adapter(str(member.adapter), name="m")
    setup = SETUPS[family]
    texts = [Template(setup["template"]).render(r) for r in rows]
    words = [setup["verbalizer"][raw] for raw in ("A", "B")]
    return label_probabilities(model, texts, words, ["m"])


def test_the_ensemble_is_the_mean_of_its_members_each_on_its_own_base(members):
    _, (bloom, llama), rows = members
    assert (
        softprompt.load(bloom.model).base.get_input_embeddings().weight.shape[0]
        != (softprompt.load(llama.model).base.get_input_embeddings().weight.shape[0])
    )
    alive: list[weakref.ref] = []
    loads = []

    def loader(name: str):
        gc.collect()
        assert all(ref() is None for ref in alive), "a base model was still in memory when the next one loaded"
        loads.append(name)
        model = softprompt.load(name)
        alive.append(weakref.ref(model))
        return model

    zero_shot = EnsembleMember(bloom.model, None, template="{text} ->", verbalizer={"A": " a", "B": " b"})
    result = ensemble_probabilities([bloom, llama, zero_shot], rows, load=loader)
    assert loads == [bloom.model, llama.model]  # the two bloom members share one load
    assert result.labels == ["A", "B"]
    expected = [alone(bloom, "bloom", rows), alone(llama, "llama", rows)]
    assert flat(result.member_probs[0]) == pytest.approx(flat(expected[0]), abs=1e-6)
    assert flat(result.member_probs[1]) == pytest.approx(flat(expected[1]), abs=1e-6)
    assert result.members[1].template == SETUPS["llama"]["template"]  # read from the adapter's metadata
    for row, p in enumerate(result.probs):
        mean = [(expected[0][row][j] + expected[1][row][j] + result.member_probs[2][row][j]) / 3 for j in (0, 1)]
        assert p == pytest.approx(mean, abs=1e-6)
        assert sum(p) == pytest.approx(1.0)
    # the members do not agree everywhere, else the mean would say nothing the members did not
    assert max(abs(a - b) for a, b in zip(flat(result.member_probs[0]), flat(result.member_probs[1]))) > 1e-3


def test_members_with_other_labels_are_one_error_naming_the_member(members):
    _, (bloom, llama), rows = members
    other = EnsembleMember(llama.model, None, template="{text}", verbalizer={"A": " a", "C": " c"})
    loads = []
    with pytest.raises(ConfigError, match=r"ensemble member 1 \(.*llama \(zero-shot\)\): labels \['A', 'C'\]"):
        ensemble_probabilities([bloom, other], rows, load=loads.append)
    assert loads == []  # refused before any base model loads
    with pytest.raises(ConfigError, match="give template and verbalizer"):
        ensemble_probabilities([EnsembleMember(llama.model)], rows)


def test_predict_ensemble_file_writes_raw_labels(members):
    tmp, (bloom, llama), rows = members
    data = write_csv(tmp / "new.csv", rows)
    path = predict_ensemble_file([bloom, llama], data, tmp / "preds.csv", id_column="ID", probabilities=True)
    written = load_rows(path)
    expected = ensemble_probabilities([bloom, llama], rows)
    assert [r["ID"] for r in written] == [r["ID"] for r in rows]
    assert [r["Label"] for r in written] == expected.predictions()
    assert [float(r["p_A"]) for r in written] == pytest.approx([p[0] for p in expected.probs], abs=1e-5)
