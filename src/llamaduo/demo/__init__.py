"""The offline demo and the test harness, kept apart from the pipeline stages.

`run` is `llamaduo demo`; `task` the shipped task (generator, checker, simulated service LLM);
`simulator` the loopback OpenAI-compatible server the demo and the tests use as a service LLM;
`tiny` a tiny model built in-process; `data/` the shipped coverage file. Nothing is imported
here, so importing the package (as the CLI does) stays cheap and torch-free.
"""
