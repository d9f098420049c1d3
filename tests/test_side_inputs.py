"""What some connectors read beside the pixels travels the same way through every path: InstructBLIP's
Q-Former ids (`Prompt.qformer_input_ids`, per tile) and LLaVA-NeXT's grid layouts (`Prompt.image_layouts`,
per image) reach the model from generation, the serving engine's batched prefill and training batches
alike, so a model trains the computation it serves.

Tiny random checkpoints built by transformers (test_interop_instructblip's and test_interop_llava_next's
builders); nothing comes from a hub.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from parity import relative_error
from test_interop_llava import noise_image

import tinyomni
from tinyomni.errors import InputError
from tinyomni.generate import SamplingParams
from tinyomni.train.data import IGNORE, ChatExample, collate_chat

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> tinyomni.Model:
    from test_interop_instructblip import build

    path = tmp_path_factory.mktemp("instructblip")
    build(path)
    return tinyomni.load(path)


@pytest.fixture(scope="module")
def next_model(tmp_path_factory) -> tinyomni.Model:
    from test_interop_llava_next import build

    path = tmp_path_factory.mktemp("llava-next")
    build(path, tower="clip", text="llama", heads=(3, 1))
    return tinyomni.load(path)


def user(*images, question: str) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                         {"type": "text", "text": question}]}]


def answered(*images, question: str, answer: str) -> list[dict]:
    return user(*images, question=question) + [{"role": "assistant", "content": answer}]


def training_logits(model: tinyomni.Model, conversations: list[list[dict]]) -> tuple[torch.Tensor, object]:
    """The training forward (trainer.ChatForward) on one batch of these conversations: the logits [N, V]
    that predict its N labelled tokens, row by row; and the batch."""
    from tinyomni.train.trainer import ChatForward

    examples = [ChatExample.of(k, *model.processor.training_example(c)) for k, c in enumerate(conversations)]
    batch = collate_chat(examples, model.tokenizer.pad_token_id)
    with torch.no_grad():
        return ChatForward(model.model)(batch, logits=True), batch


def inference_logits(model: tinyomni.Model, conversation: list[dict]) -> torch.Tensor:
    """The inference forward on the conversation's training ids with the media and side inputs of its
    prompt (what Model.chat gives the model): the logits at its labelled positions."""
    prompt, labels = model.processor.training_example(conversation)
    asked = model.prepare(conversation[:-1])
    assert prompt.input_ids[:len(asked.input_ids)] == asked.input_ids  # the prompt is the one served
    with torch.no_grad():
        logits, _ = model.model(
            torch.tensor([prompt.input_ids]), pixel_values=asked.pixel_values,
            qformer_input_ids=[torch.tensor(q) for q in asked.qformer_input_ids] or None,
            image_layouts=asked.image_layouts or None)
        served, _ = model.model(
            torch.tensor([asked.input_ids]), pixel_values=asked.pixel_values,
            qformer_input_ids=[torch.tensor(q) for q in asked.qformer_input_ids] or None,
            image_layouts=asked.image_layouts or None, logits_to_keep=1)
    keep = torch.tensor(labels[1:]) != IGNORE
    ours = logits[0, :-1][keep]
    # The first answer token is predicted from the served prompt's last position: the same logits.
    assert relative_error(ours[0], served[0, -1]) <= 1e-5
    return ours


# --- InstructBLIP: the Q-Former's instruction in training ----------------------------------------------
def test_instructblip_trains_the_computation_it_serves(blip: tinyomni.Model) -> None:
    """A training batch carries each tile's Q-Former ids (the text before the first answer, as the prompt of
    that answer gives them), so the training forward's logits equal the inference forward's."""
    conversations = [answered(noise_image(70, 50, seed=3), question="How many red circles are there?", answer="3"),
                     answered(noise_image(30, 60, seed=4), question="What is in the picture?",
                              answer="A red circle.")]
    scores, batch = training_logits(blip, conversations)
    assert [q.tolist() for q in batch.qformer_input_ids] == [
        blip.prepare(c[:1]).qformer_input_ids[0] for c in conversations]
    expected = torch.cat([inference_logits(blip, c) for c in conversations])
    assert scores.shape == expected.shape
    assert relative_error(scores, expected) <= 1e-5


def test_instructblip_training_reaches_the_instruction_embeddings(blip: tinyomni.Model) -> None:
    """The loss depends on the instruction: its gradient reaches the Q-Former's word embeddings of the
    instruction's tokens (and nothing else of that table)."""
    from tinyomni.train.trainer import ChatForward

    conversation = answered(noise_image(40, 40, seed=5), question="How many red circles are there?", answer="2")
    example = ChatExample.of(0, *blip.processor.training_example(conversation))
    batch = collate_chat([example], blip.tokenizer.pad_token_id)
    table = blip.model.multi_modal_projector.qformer.embeddings.word_embeddings.weight
    table.grad = None
    ChatForward(blip.model)(batch).backward()
    touched = set(table.grad.abs().sum(-1).nonzero()[:, 0].tolist())
    assert touched == set(example.qformer_input_ids[0])
    blip.model.zero_grad(set_to_none=True)


# --- LLaVA-NeXT: the layouts beside the pixels ---------------------------------------------------------
def test_llava_next_trains_the_computation_it_serves(next_model: tinyomni.Model) -> None:
    """Rows with one and two images of different grids: the batch holds 3-channel pixels and every image's
    layout in order, and the training forward's logits equal the inference forward's."""
    wide, tall, square = noise_image(150, 70, seed=3), noise_image(40, 100, seed=4), noise_image(50, 50, seed=5)
    conversations = [answered(wide, question="What is in the picture?", answer="A red circle."),
                     answered(tall, square, question="How many red circles are there?", answer="3")]
    scores, batch = training_logits(next_model, conversations)
    assert batch.pixel_values.shape[1] == 3
    layouts = [layout for c in conversations for layout in next_model.prepare(c[:1]).image_layouts]
    assert batch.image_layouts == layouts and len(layouts) == 3
    assert sum(layout.tiles for layout in layouts) == batch.pixel_values.shape[0]
    expected = torch.cat([inference_logits(next_model, c) for c in conversations])
    assert relative_error(scores, expected) <= 1e-5


def test_llava_next_is_served_as_it_answers_alone(next_model: tinyomni.Model) -> None:
    """The serving engine passes each request's layouts: prompts with different grids (and a text-only one)
    prefilled together answer as Model.complete does alone."""
    from test_serve_batched_prefill import check_answers, gated_engine

    chosen = [user(noise_image(150, 70, seed=1), question="What is in the picture?"), "hi",
              user(noise_image(40, 100, seed=2), noise_image(60, 60, seed=6), question="Describe the image.")]
    params = SamplingParams(max_new_tokens=6)
    expected = [next_model.complete(c, max_new_tokens=6) for c in chosen]
    engine, gate = gated_engine(next_model, max_batch=4)
    engine.start()
    try:
        requests = [engine.submit(next_model.prepare(c), params) for c in chosen]
        gate.set()
        check_answers(requests, expected)
        assert engine.prefills == 1
    finally:
        engine.close()


def test_llava_next_layouts_survive_a_bfloat16_model(next_model: tinyomni.Model) -> None:
    """The layouts are not pixels: casting the pixel values (a bf16 model) leaves them alone, and the bf16
    forward's logits stay near the fp32 ones."""
    prompt = next_model.prepare(user(noise_image(150, 70, seed=3), question="What is in the picture?"))
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        full, _ = next_model.model(ids, pixel_values=prompt.pixel_values, image_layouts=prompt.image_layouts)
        next_model.model.to(torch.bfloat16)
        try:
            half, _ = next_model.model(ids, pixel_values=prompt.pixel_values.to(torch.bfloat16),
                                       image_layouts=prompt.image_layouts)
        finally:
            next_model.model.to(torch.float32)
    assert relative_error(half.float(), full) <= 5e-2


def test_side_inputs_a_model_does_not_take_are_refused(blip: tinyomni.Model, next_model: tinyomni.Model) -> None:
    anyres = next_model.prepare(user(noise_image(90, 40), question="What is in the picture?"))
    prompt = blip.prepare(user(noise_image(28, 28), question="What is in the picture?"))
    with pytest.raises(InputError, match="takes no image layouts"):
        blip.model(torch.tensor([prompt.input_ids]), pixel_values=prompt.pixel_values,
                   qformer_input_ids=[torch.tensor(q) for q in prompt.qformer_input_ids],
                   image_layouts=anyres.image_layouts)
    with pytest.raises(InputError, match="image_layouts without pixel values"):
        next_model.model(torch.tensor([anyres.input_ids]), image_layouts=anyres.image_layouts)


def test_info_shows_the_grids(next_model: tinyomni.Model, capsys) -> None:
    """`tinyomni info` on LLaVA-NeXT: the most tiles an image becomes (the whole image + the largest grid)
    and the grid resolutions, not max_tiles 1."""
    from test_interop_llava_next import PINPOINTS, TILE

    from tinyomni.cli import main

    facts = next_model.info()
    assert facts["max_tiles"] == 5 and facts["grid_pinpoints"] == PINPOINTS  # 2x2 grid + the whole image
    tall = next_model.prepare(user(noise_image(2 * TILE, 2 * TILE), question="?"))
    assert tall.tiles_per_image == [facts["max_tiles"]]
    assert main(["info", "--model", next_model.name]) == 0
    shown = capsys.readouterr().out
    assert "the whole image + a grid of up to 4" in shown and "84x42" in shown


def test_a_saved_llava_next_keeps_its_grids(next_model: tinyomni.Model, tmp_path: Path) -> None:
    """The saved checkpoint's prompts carry the same layouts (they come from the config, not the weights)."""
    next_model.save(tmp_path / "saved")
    again = tinyomni.load(tmp_path / "saved")
    messages = user(noise_image(150, 70, seed=3), question="What is in the picture?")
    assert again.prepare(messages).image_layouts == next_model.prepare(messages).image_layouts
