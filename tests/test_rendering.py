"""The loss mask: exactly the assistant answers and their end-of-turn token, from offsets."""

from tuneforge.data.formats import Example
from tuneforge.data.rendering import prompt_ids, tokenize_example


def trained_text(tok, tokenizer):
    return [tokenizer.decode([i]) for i, t in zip(tok.input_ids, tok.trained, strict=True) if t]


def test_only_assistant_answer_and_eos_are_trained(tokenizer):
    ex = Example(messages=[{"role": "user", "content": "Where is my parcel?"},
                           {"role": "assistant", "content": "shipping"}])
    tok = tokenize_example(ex, tokenizer)
    assert "".join(trained_text(tok, tokenizer)) == "shipping<|im_end|>"
    # pad == eos for SmolLM2, and still the EOS is a target: masks never come from token ids
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tok.trained[tok.input_ids.index(tokenizer.eos_token_id, len(tok) - 3)]


def test_every_assistant_turn_of_a_multi_turn_conversation_is_trained(tokenizer):
    ex = Example(messages=[{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                           {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    tok = tokenize_example(ex, tokenizer)
    text = "".join(trained_text(tok, tokenizer))
    assert text == "Hello there<|im_end|>4<|im_end|>"


def test_answer_that_also_appears_in_the_prompt_is_masked_by_position(tokenizer):
    # a string search for "yes" would hit the user turn first; offsets do not
    ex = Example(messages=[{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"}])
    tok = tokenize_example(ex, tokenizer)
    first_yes = next(j for j, i in enumerate(tok.input_ids) if tokenizer.decode([i]).strip() == "yes")
    assert not tok.trained[first_yes]
    assert "".join(trained_text(tok, tokenizer)) == "yes<|im_end|>"


def test_training_prefix_equals_the_inference_prompt(tokenizer):
    messages = [{"role": "user", "content": "Where is order #A123?"}, {"role": "assistant", "content": "shipping"}]
    tok = tokenize_example(Example(messages=messages), tokenizer)
    prompt = prompt_ids(tokenizer, messages[:-1])
    assert tok.input_ids[: len(prompt)] == prompt
    assert not any(tok.trained[: len(prompt)])
    assert tok.trained[len(prompt)]


def test_template_without_end_token_gets_eos_appended(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                           "{% if add_generation_prompt %}assistant: {% endif %}")
    tok = tokenize_example(Example(messages=[{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]), plain)
    assert "".join(trained_text(tok, plain)).strip() == "hello<|im_end|>"


def test_train_on_all_and_plain_text(tokenizer):
    ex = Example(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    assert all(tokenize_example(ex, tokenizer, train_on="all").trained)
    tok = tokenize_example(Example(text="Raw text for pretraining."), tokenizer)
    assert all(tok.trained) and tok.input_ids[-1] == tokenizer.eos_token_id
