"""Engine side: what runs inside each ipyparallel engine.

``state`` (rank, device, process group, the cache between cells), ``runner`` (this rank's
part of the model), ``decode`` (the run loop), ``telemetry`` (what an engine measures) and
``publish`` (sending it to the client while a task runs). Nothing here imports the client.
"""
