"""timm networks as the teacher and the student both use them (docs/ARCHITECTURE.md#layers `nets/`): construction
with one-line errors, stage taps and the tapped forward (`tapped`), ScaleKD's frozen teacher tail (`tail`)."""
