"""The run machinery: the stage table and options, the run context, ranks, the image cache, peak memory."""
