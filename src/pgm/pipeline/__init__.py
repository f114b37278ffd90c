"""One way in: `pgm.load(source)` gives a pipeline that holds a model with everything it needs to
turn requests into samples: its tokenizer (text) or its VQ tokenizer (images), the device and
the precision.

    pipe = pgm.load("runs/text-small")
    pipe.generate(prompt="The Emperor Napoleon", steps=32)          # -> [str]
    pipe.generate(infill="It was {{10}} night.", num_samples=2)     # -> [str, str]
    for event in pipe.stream(steps=16): ...                         # one StepEvent per step
    pipe.score(["Some text."])                                      # -> [TextScore]

    pipe = pgm.load("runs/fmnist-pgm")
    pipe.generate(classes=["sneaker", "bag"], guidance=3)           # -> [PIL.Image, PIL.Image]

`source` is a run directory, a pretrained directory, one of the authors' checkpoint files or a
Hub id (see `pgm.hub`). Every request is checked here, once, for the command line, Python and
any server alike: an argument that does not apply to the model, a value out of range or a
malformed template is one sentence (a ValueError), never a silent default. The argument names
are the command line's flags (`num_samples` is `--num-samples`), with the same defaults: what
to generate (`GenerationRequest`) and how (`pgm.sampling.settings.SamplerSettings`).

- request.py: the request, its samples, its step events and stream;
- base.py: what every pipeline does (plans, streams, validation);
- text.py, image.py: the text and image pipelines (and the VQ tokenizer's);
- load.py: `load` and `convert`.
"""

from ..pictures import to_pictures
from .base import Pipeline, SamplingPlan
from .image import ImagePipeline, VQPipeline
from .load import convert, load
from .request import GenerationRequest, Samples, StepEvent, Stream
from .text import TextPipeline

__all__ = ["GenerationRequest", "ImagePipeline", "Pipeline", "Samples", "SamplingPlan", "StepEvent", "Stream",
           "TextPipeline", "VQPipeline", "convert", "load", "to_pictures"]
