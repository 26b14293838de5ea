"""Generation and chat: exact greedy tokens against transformers, KV-cache reuse across turns,
stop/EOS/length handling, seeds, and the built-in chat templates."""

import copy
import functools
import random
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch

import checkpoints
from conftest import random_image
from mlx_llava_next import ChatSession, PromptError, generate, load, stream_generate
from mlx_llava_next.chat_templates import TEMPLATES
from mlx_llava_next.generate import StopStrings
from mlx_lm.models.cache import trim_prompt_cache

BACKBONES = ["llama", "mistral", "qwen2"]
QUESTION = "What is shown?"


def hf_greedy(ck, images, question, n):
    """transformers' greedy generate with EOS disabled: exactly n new tokens."""
    inputs = ck.hf_processor(text=ck.prompt(question, n_images=len(images)), images=images, return_tensors="pt")
    config = copy.deepcopy(ck.reference.generation_config)
    config.eos_token_id = None
    config.pad_token_id = 0
    config.max_new_tokens, config.do_sample = n, False
    with torch.no_grad():
        out = ck.reference.generate(**inputs, generation_config=config)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("name", BACKBONES)
def test_greedy_generate_matches_transformers(tiny_checkpoint, name):
    ck = tiny_checkpoint(name)
    model, processor = ck.load()
    images = [random_image(90, 150, seed=1), random_image(120, 60, seed=2)]  # two anyres grids
    expected = hf_greedy(ck, images, QUESTION, 20)
    result = generate(model, processor, QUESTION, images=images, max_tokens=20, eos_token_ids=())
    assert result.tokens == expected
    assert result.finish_reason == "length" and result.generation_tokens == 20
    # The already formatted prompt (contains <image>) is used as is and gives the same tokens.
    formatted = generate(model, processor, ck.prompt(QUESTION, 2), images=images, max_tokens=20, eos_token_ids=())
    assert formatted.tokens == expected


def test_bos_in_rendered_prompt_is_not_doubled(tiny_checkpoint):
    ck = tiny_checkpoint("mistral")
    model, processor = ck.load()
    image = random_image(90, 150, seed=1)
    plain = generate(model, processor, ck.prompt(QUESTION), images=[image], max_tokens=4)
    with_bos = generate(model, processor, "<s>" + ck.prompt(QUESTION), images=[image], max_tokens=4)
    expected_len = ck.hf_processor(text=ck.prompt(QUESTION), images=[image], return_tensors="np")["input_ids"].shape[1]
    assert plain.prompt_tokens == with_bos.prompt_tokens == expected_len
    assert plain.tokens == with_bos.tokens


class Counters:
    """Counts vision-tower runs and the tokens each language-model call receives."""

    def __init__(self, model, monkeypatch):
        self.encode_calls, self.vision_calls, self.lm_calls = 0, 0, []
        encode = model.encode_images

        def counting_encode(*args, **kwargs):
            self.encode_calls += 1
            return encode(*args, **kwargs)

        vision_call = type(model.vision_tower).__call__

        def counting_vision(module, *args, **kwargs):
            self.vision_calls += 1
            return vision_call(module, *args, **kwargs)

        lm_call = type(model.language_model).__call__

        @functools.wraps(lm_call)  # keeps the signature mlx-lm inspects for input_embeddings
        def counting_lm(module, inputs, cache=None, input_embeddings=None, **kwargs):
            self.lm_calls.append((input_embeddings if input_embeddings is not None else inputs).shape[1])
            return lm_call(module, inputs, cache=cache, input_embeddings=input_embeddings, **kwargs)

        monkeypatch.setattr(model, "encode_images", counting_encode)
        monkeypatch.setattr(type(model.vision_tower), "__call__", counting_vision)
        monkeypatch.setattr(type(model.language_model), "__call__", counting_lm)


def hf_messages(messages):
    return [
        {"role": m["role"], "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]}
        for m in messages
    ]


def hf_logprobs(ck, messages, images, generated):
    """log-softmax of transformers' logits at every position that predicts a generated token,
    from one fresh forward pass over the whole conversation (rows: one per predicted token, up
    to a sampled <image> token); also the prompt ids."""
    prompt = ck.hf_processor.apply_chat_template(hf_messages(messages), add_generation_prompt=True)
    inputs = ck.hf_processor(text=prompt, images=images, return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    fed = generated[:-1]
    image_id = ck.reference.config.image_token_index
    if image_id in fed:  # a random model may sample <image>; transformers would take it for a placeholder
        fed = fed[: fed.index(image_id)]
    ids = torch.cat([inputs["input_ids"], torch.tensor([fed], dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = ck.reference(input_ids=ids, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).logits
    return torch.log_softmax(logits[0, n - 1 :].float(), dim=-1).numpy(), inputs["input_ids"][0].tolist()


@pytest.mark.parametrize("name", BACKBONES)
def test_three_turn_chat_reuses_cache(tiny_checkpoint, monkeypatch, name):
    ck = tiny_checkpoint(name)
    model, processor = ck.load()
    counters = Counters(model, monkeypatch)
    image = random_image(90, 150, seed=3)
    chat = ChatSession(model, processor, max_tokens=6)
    turns = [("What is shown?", [image]), ("And the colour?", []), ("Anything else in the picture?", [])]
    previous_prompt = []
    for question, images in turns:
        counters.lm_calls.clear()
        responses = list(chat.stream(question, images))
        generated = [r.token for r in responses]
        full_prompt = chat.tokens[: len(chat.tokens) - len(generated)]
        new_tokens = sum(counters.lm_calls) - len(generated)  # each sampled token is fed back once
        # Only the part past the reused cache is prefilled, and the reused part covers at
        # least the whole previous prompt (it is a prefix of this one).
        assert new_tokens == responses[-1].prompt_tokens == len(full_prompt) - responses[-1].cached_tokens
        assert responses[-1].cached_tokens >= len(previous_prompt) and full_prompt[: len(previous_prompt)] == previous_prompt
        previous_prompt = full_prompt
    assert counters.encode_calls == 1 and counters.vision_calls == 1
    assert responses[-1].cached_tokens > 0

    # The last turn equals transformers' fresh forward over the whole conversation.
    expected, hf_ids = hf_logprobs(ck, chat.messages[:-1], [image], generated)
    assert hf_ids == previous_prompt
    ours = np.stack([np.array(r.logprobs) for r in responses])[: len(expected)]
    assert np.abs(ours - expected).max() < 1e-4


def test_interrupted_turn_and_saved_session(tiny_checkpoint, tmp_path, monkeypatch):
    ck = tiny_checkpoint("llama")
    model, processor = ck.load()
    image = random_image(100, 70, seed=4)
    chat = ChatSession(model, processor, system="You read scans.", max_tokens=8)
    chat.ask("What is shown?", [image])
    stream = chat.stream("Say more.")
    partial = [next(stream).token, next(stream).token]
    stream.close()  # as the CLI does on Ctrl-C
    assert chat.messages[-1]["role"] == "assistant"
    assert chat.cache[0].offset == len(chat.tokens) and chat.tokens[-2:] == partial

    path = chat.save(tmp_path / "session.safetensors")
    restored = ChatSession.load(path, model, processor, max_tokens=8)
    assert restored.messages == chat.messages and restored.tokens == chat.tokens

    counters = Counters(model, monkeypatch)
    after_restore = [r.token for r in restored.stream("Is there text?")]
    assert counters.encode_calls == 0  # the image is known by hash, its tokens are cached
    continued = list(chat.stream("Is there text?"))
    generated = [r.token for r in continued]
    assert after_restore == generated

    # The turn after the interruption sees the logits of a fresh forward pass.
    expected, hf_ids = hf_logprobs(ck, chat.messages[:-1], [image], generated)
    assert hf_ids == chat.tokens[: len(chat.tokens) - len(generated)]
    ours = np.stack([np.array(r.logprobs) for r in continued])[: len(expected)]
    assert np.abs(ours - expected).max() < 1e-4


def test_cache_cut_inside_an_image(tiny_checkpoint, monkeypatch):
    """A cache that ends inside an image's tokens (e.g. a prefill stopped between chunks) is
    continued with the rest of that image's cached features."""
    ck = tiny_checkpoint("llama")
    model, processor = ck.load()
    counters = Counters(model, monkeypatch)
    image = random_image(90, 150, seed=5)
    chat = ChatSession(model, processor, max_tokens=4)
    chat.ask("What is shown?", [image])
    cut = chat.tokens.index(processor.image_token_id) + 7
    trim_prompt_cache(chat.cache, len(chat.tokens) - cut)
    chat.tokens = chat.tokens[:cut]
    responses = list(chat.stream("Again?"))
    assert responses[-1].cached_tokens == cut and counters.encode_calls == 1
    expected, _ = hf_logprobs(ck, chat.messages[:-1], [image], [r.token for r in responses])
    ours = np.stack([np.array(r.logprobs) for r in responses])[: len(expected)]
    assert np.abs(ours - expected).max() < 1e-4


def test_session_file_from_another_model_is_refused(tiny_checkpoint, tmp_path):
    llama, qwen = tiny_checkpoint("llama").load(), tiny_checkpoint("qwen2").load()
    chat = ChatSession(*llama, max_tokens=2)
    chat.ask("Hello")
    path = chat.save(tmp_path / "s.safetensors")
    with pytest.raises(Exception, match="different model"):
        ChatSession.load(path, *qwen)


def test_finish_reasons(tiny_checkpoint, monkeypatch):
    ck = tiny_checkpoint("llama")
    model, processor = ck.load()
    image = random_image(90, 150, seed=1)
    base = generate(model, processor, QUESTION, images=[image], max_tokens=14, eos_token_ids=())
    assert base.finish_reason == "length" and len(base.tokens) == 14

    # EOS (the tokenizer's set): ends with "stop"; the EOS token is returned, its text is not.
    k = 6
    eos = base.tokens[k]
    first = base.tokens.index(eos)
    monkeypatch.setattr(processor.tokenizer, "_eos_token_ids", {eos})
    stopped = generate(model, processor, QUESTION, images=[image], max_tokens=14)
    monkeypatch.undo()
    assert stopped.finish_reason == "stop"
    assert stopped.tokens == base.tokens[: first + 1]
    if first:
        assert stopped.text == generate(model, processor, QUESTION, images=[image], max_tokens=first, eos_token_ids=()).text

    # A stop string: the text ends right before it, also when it spans several tokens.
    text = base.text
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    responses = list(stream_generate(model, processor, QUESTION, images=[image], max_tokens=14, stop=[stop]))
    assert responses[-1].finish_reason == "stop"
    assert all(r.finish_reason is None for r in responses[:-1])
    assert "".join(r.text for r in responses) == text[: text.index(stop)]


def test_stop_strings_stream_like_str_find():
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        s, out, hit = StopStrings(stops), "", False
        for i, chunk in enumerate(chunks):
            piece, hit = s.feed(chunk, final=i == len(chunks) - 1)
            out += piece
            if hit:
                break
        hits = [text.find(x) for x in stops if x in text]
        assert (out, hit) == ((text[: min(hits)], True) if hits else (text, False))


def test_seeded_sampling_is_reproducible(tiny_checkpoint):
    model, processor = tiny_checkpoint("qwen2").load()
    image = random_image(90, 150, seed=1)
    kwargs = dict(images=[image], max_tokens=16, temperature=1.0, top_k=50, eos_token_ids=())
    a = generate(model, processor, QUESTION, seed=3, **kwargs)
    mx.random.seed(12345)
    b = generate(model, processor, QUESTION, seed=3, **kwargs)
    c = generate(model, processor, QUESTION, seed=4, **kwargs)
    greedy = generate(model, processor, QUESTION, images=[image], max_tokens=16, eos_token_ids=())
    assert a.tokens == b.tokens
    assert c.tokens != a.tokens and a.tokens != greedy.tokens


def test_prompt_longer_than_context_window(tiny_checkpoint):
    model, processor = tiny_checkpoint("mistral").load()
    limit = model.config.text_config["max_position_embeddings"]
    long = "word " * (limit + 10)
    with pytest.raises(PromptError, match=rf"tokens long .* context window is {limit} tokens"):
        generate(model, processor, long, max_tokens=2)
    chat = ChatSession(model, processor, max_tokens=2)
    with pytest.raises(PromptError, match="context window"):
        chat.ask(long)
    assert chat.messages == [] and chat.ask("Hi").generation_tokens == 2  # the session goes on


# -- built-in chat templates --------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A scan."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "And these?"}]},
]


@pytest.mark.parametrize(
    "family, llava_hf_template",
    [("mistral", checkpoints.MISTRAL_TEMPLATE), ("vicuna", checkpoints.VICUNA_TEMPLATE), ("chatml", checkpoints.CHATML_TEMPLATE)],
)
def test_builtin_templates_render_like_llava_hf(family, llava_hf_template):
    tok = checkpoints.build_tokenizer("spm")
    for messages in (CONVERSATION, CONVERSATION[1:2]):
        ours = tok.apply_chat_template(messages, chat_template=TEMPLATES[family], add_generation_prompt=True, tokenize=False)
        theirs = tok.apply_chat_template(messages, chat_template=llava_hf_template, add_generation_prompt=True, tokenize=False)
        assert ours == theirs


@pytest.mark.parametrize("name, family", [("llama", "vicuna"), ("mistral", "mistral"), ("qwen2", "chatml")])
def test_checkpoint_without_template_falls_back(tiny_checkpoint, tmp_path, name, family):
    ck = tiny_checkpoint(name)
    shutil.copytree(ck.path, tmp_path / "m", ignore=shutil.ignore_patterns("chat_template.*"))
    model, processor = load(tmp_path / "m")
    assert processor.chat_template_source == f"built-in ({family})"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert processor.apply_chat_template(messages) == ck.prompt(QUESTION)
