"""The lab: equipment that measures and demonstrates the library, which nothing else in the library imports
(only `flows/` and the tests; tests/test_layers.py holds it to that).

    experiments.py     named scenarios end to end (`distillery experiment`, the demo, docs/results.md)
    bench.py           `distillery bench`: every benchmark side by side in one run
    storage_bench.py   what a cache costs per sample-view; the pass + statistics at N, 2N, 4N samples
    input_bench.py     the input pipeline: stream per core vs resnet18/50, pass and first step at N, 2N, 4N
    loader_bench.py    DataLoader worker start methods side by side (`python -m pipeline.lab.loader_bench`)
    inspect_bench.py   the time `distillery inspect` takes on a large synthetic cache
    synthetic.py       the one synthetic-cache writer: made-up teacher outputs, any layout, real writer
    image_folder.py    a synthetic ImageNet-like image folder (1/f noise + shapes, JPEGs; 12 MP photos)
"""
