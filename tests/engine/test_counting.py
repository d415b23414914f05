"""How-many questions: the counted noun and the answer that states the measured count."""

from napari_medplib.engine.counting import counted_answer, how_many_noun, plural, singular


def test_nouns_of_how_many_questions():
    assert how_many_noun("How many nuclei are there?") == "nuclei"
    assert how_many_noun("Roughly how many cells can you see?") == "cells"
    assert how_many_noun("What is this?") is None
    assert plural("nucleus") == "nuclei" and singular("nuclei") == "nucleus" and singular("cells") == "cell"


def test_counted_answer_states_the_measured_count_and_keeps_a_differing_guess():
    assert counted_answer("12", "nuclei", 40) == (
        "40 nuclei. (counted from the segmented objects; the model's own estimate was 12)")
    assert counted_answer("There are 40.", "nucleus", 40) == "40 nuclei. (counted from the segmented objects)"
    assert counted_answer("no", "cells", 1) == "1 cell. (counted from the segmented objects)"
    assert counted_answer("", "cell", 1) == "1 cell. (counted from the segmented objects)"
