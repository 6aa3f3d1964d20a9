import pytest

from monkeytune.data.messages import Turn
from monkeytune.data.templates import build_prompt, encode_conversation

X = -100
IMG = [1, 3, 3, 2]  # <img> <imgpad> <imgpad> </img> with 2 tokens per image


def T(text):
    """Ids of the character tokenizer: code point + 16."""
    return [16 + ord(c) for c in text]


TURNS = [
    Turn.from_text("user", "<img>a.png</img>Hi?"),
    Turn.from_text("assistant", "Yo"),
    Turn.from_text("user", "Ok?"),
    Turn.from_text("assistant", "No"),
]


def mask(labels):
    return "".join("." if x == X else "L" for x in labels)


def test_monkey_template_exact_ids_and_labels(tok):
    enc = encode_conversation("monkey", TURNS, tok, tokens_per_image=2)
    # user text, answer, <|endoftext|> for each exchange; no separators, no role names.
    assert enc.input_ids == IMG + T("Hi?") + T("Yo") + [0] + T("Ok?") + T("No") + [0]
    assert enc.labels == [X] * 4 + [X] * 3 + T("Yo") + [0] + [X] * 3 + T("No") + [0]
    assert mask(enc.labels) == "......." "LLL" "..." "LLL"
    assert enc.image_paths == ["a.png"]
    assert enc.exchange_ends == [10, 16] and enc.exchange_images == [1, 0]
    assert enc.num_supervised == 6


def test_chatml_template_exact_ids_and_labels(tok):
    enc = encode_conversation("chatml", TURNS, tok, tokens_per_image=2)
    nl = T("\n")
    system = [4] + T("system") + nl + T("You are a helpful assistant.") + [5] + nl
    user1 = [4] + T("user") + nl + IMG + T("Hi?") + [5] + nl
    asst1_head, asst1 = [4] + T("assistant") + nl, T("Yo") + [5]
    user2 = [4] + T("user") + nl + T("Ok?") + [5] + nl
    asst2_head, asst2 = [4] + T("assistant") + nl, T("No") + [5]
    assert enc.input_ids == system + user1 + asst1_head + asst1 + nl + user2 + asst2_head + asst2 + nl
    assert enc.labels == (
        [X] * len(system + user1 + asst1_head) + T("Yo") + [5] + [X]
        + [X] * len(user2 + asst2_head) + T("No") + [5] + [X]
    )
    # The same thing written as text: Qwen-VL-Chat's layout.
    assert tok.decode(enc.input_ids, skip_special=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<img><imgpad><imgpad></img>Hi?<|im_end|>\n"
        "<|im_start|>assistant\nYo<|im_end|>\n"
        "<|im_start|>user\nOk?<|im_end|>\n"
        "<|im_start|>assistant\nNo<|im_end|>\n"
    )
    assert mask(enc.labels).count("L") == 6


def test_chatml_custom_system_prompt(tok):
    enc = encode_conversation("chatml", TURNS[:2], tok, 2, system="Be brief.")
    assert tok.decode(enc.input_ids, skip_special=False).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    )


@pytest.mark.parametrize("template", ["monkey", "chatml"])
def test_build_prompt_is_the_training_prefix(tok, template):
    enc = encode_conversation(template, TURNS, tok, 2)
    messages = [{"role": t.role, "content": t.text} for t in TURNS[:3]]
    ids, paths = build_prompt(template, messages, tok, 2)
    answer_start = enc.exchange_ends[1] - (len(T("No")) + 1 + (1 if template == "chatml" else 0))
    assert ids == enc.input_ids[:answer_start]
    assert paths == ["a.png"]
    # from/value dicts and role aliases are accepted too.
    alt = [{"from": {"user": "human", "assistant": "gpt"}[t.role], "value": t.text} for t in TURNS[:3]]
    assert build_prompt(template, alt, tok, 2)[0] == ids


def test_chatml_generation_prompt_flag(tok):
    msgs = [{"role": "user", "content": "Hi"}]
    with_prompt, _ = build_prompt("chatml", msgs, tok, 2)
    without, _ = build_prompt("chatml", msgs, tok, 2, add_generation_prompt=False)
    assert with_prompt == without + [4] + T("assistant") + T("\n")
    assert tok.decode(without, skip_special=False).endswith("<|im_start|>user\nHi<|im_end|>\n")


def test_prompt_errors(tok):
    with pytest.raises(ValueError, match="monkey template has no system prompt"):
        build_prompt("monkey", [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], tok, 2)
    with pytest.raises(ValueError, match="expected a user turn"):
        build_prompt("chatml", [{"role": "assistant", "content": "a"}], tok, 2)
    with pytest.raises(ValueError, match="unknown template"):
        build_prompt("llama", [{"role": "user", "content": "q"}], tok, 2)


def test_keep_exchanges_cuts_between_whole_exchanges(tok):
    enc = encode_conversation("monkey", TURNS, tok, 2)
    first = enc.keep_exchanges(1)
    assert first.input_ids == IMG + T("Hi?") + T("Yo") + [0]
    assert first.labels == enc.labels[:10] and first.image_paths == ["a.png"]
