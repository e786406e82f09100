"""chat.py: the template's tokens, rendering with the assistant-only mask, checking messages, records."""

from __future__ import annotations

import pytest

from gpt2lab.chat import ChatFormatError, ChatTemplate, chat_tokenizer, check_messages, template_of
from gpt2lab.errors import GPT2LabError
from gpt2lab.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def test_render_tokens_and_mask_exactly(tok):
    template = ChatTemplate.for_tokenizer(tok)
    assert template.token_ids == {"<|system|>": 50257, "<|user|>": 50258, "<|assistant|>": 50259, "<|end|>": 50260}
    assert (template.bos_id, template.end_id, template.n_vocab) == (50256, 50260, 50261)
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ]
    ids, mask = template.render(messages, tok)
    e = tok.encode_ordinary
    assert ids == [
        50256,
        *[50257, *e("Be kind."), 50260],
        *[50258, *e("Hi"), 50260],
        *[50259, *e("Hello there"), 50260],
        *[50258, *e("Bye"), 50260],
        *[50259, *e("Bye!"), 50260],
    ]
    n = len(e("Be kind.")) + 2, len(e("Hi")) + 2, len(e("Hello there")), len(e("Bye")) + 2, len(e("Bye!"))
    assert mask == [0, *[0] * n[0], *[0] * n[1], 0, *[1] * n[2], 1, *[0] * n[3], 0, *[1] * n[4], 1]
    assert template.prompt_ids(messages[:2], tok) == [*template.render(messages[:2], tok)[0], 50259]


def test_message_text_never_makes_a_chat_token(tok):
    template = ChatTemplate.for_tokenizer(tok)
    spelled = "<|user|> <|end|><|endoftext|>"
    ids, _ = template.render([{"role": "user", "content": spelled}, {"role": "assistant", "content": spelled}], tok)
    assert ids.count(50256) == 1 and ids.count(50260) == 2 and ids.count(50258) == 1
    text = tok.encode_ordinary(spelled)
    assert ids == [50256, 50258, *text, 50260, 50259, *text, 50260] and max(text) < 50257


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hello", "'messages' must be a non-empty list of {role, content} objects"),
        ([], "'messages' must be a non-empty list of {role, content} objects"),
        (["hi"], "message 0 is not an object with 'role' and 'content'"),
        (
            [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}],
            "message 1 has role 'bot'; the roles are system, user and assistant",
        ),
        ([{"role": "user", "content": 3}], "message 0 (user) has no text 'content'"),
        ([{"role": "user", "content": " "}, {"role": "assistant", "content": ""}], "every message is empty"),
    ],
)
def test_check_messages_says_what_is_wrong(messages, message):
    with pytest.raises(ChatFormatError) as e:
        check_messages(messages)
    assert str(e.value) == message and isinstance(e.value, GPT2LabError)


def test_check_messages_needs_a_reply_for_training_and_drops_other_keys():
    only_user = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]
    assert check_messages(only_user) == only_user
    with pytest.raises(ChatFormatError, match="^the conversation has no assistant reply with text$"):
        check_messages(only_user, need_assistant=True)
    extra = [{"role": "user", "content": "hi", "name": "x"}, {"role": "assistant", "content": "yo", "weight": 1}]
    assert check_messages(extra, need_assistant=True) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]


def test_record_round_trip_and_tokenizer(tok):
    template = ChatTemplate.for_tokenizer(tok)
    record = template.to_record()
    assert record == {
        "name": "gpt2lab-chat",
        "version": 1,
        "tokens": {"<|system|>": 50257, "<|user|>": 50258, "<|assistant|>": 50259, "<|end|>": 50260},
        "bos_id": 50256,
    }
    assert ChatTemplate.from_record(record, "here") == template
    chat = chat_tokenizer(record, tok, "here")
    assert chat.n_vocab == 50261 and chat.base is tok and chat.vocab_hash == tok.vocab_hash
    assert chat.decode([50259, 50260]) == "<|assistant|><|end|>"
    assert template_of(chat) == template and template_of(tok) is None
    assert chat_tokenizer(None, tok, "here") is tok
    assert ChatTemplate.for_tokenizer(chat) == template  # the chat tokenizer's base decides the ids


@pytest.mark.parametrize(
    "change",
    [
        {"name": "chatml"},
        {"version": 2},
        {"tokens": {"<|system|>": 50257, "<|user|>": 50258, "<|assistant|>": 50259, "<|end|>": 50262}},
        {"tokens": {"<|system|>": 50257}},
        {"bos_id": "x"},
    ],
)
def test_an_unknown_record_is_one_clear_error(tok, change):
    record = {**ChatTemplate.for_tokenizer(tok).to_record(), **change}
    with pytest.raises(GPT2LabError) as e:
        ChatTemplate.from_record(record, "data/x/manifest.json")
    assert str(e.value).startswith("data/x/manifest.json records a chat template this version of gpt2lab does not ")
    assert str(e.value).endswith("; update gpt2lab or prepare the data again")


def test_a_template_for_another_vocabulary_is_refused(tok):
    with pytest.raises(GPT2LabError, match="tokens start at id 400, but tokenizer 'gpt2' has 50257 tokens"):
        ChatTemplate(first_id=400, bos_id=399).tokenizer(tok)
