"""Export a trained multi-exit model as one graph per exit stage (ONNX) and run it with early exit
in ONNX Runtime: `python -m met_lightning.export checkpoint=RUN format=onnx out=DIR`."""
