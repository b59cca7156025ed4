"""What lvit reads and writes on disk: run folders (:mod:`.runs`), model folders in the Hugging Face layout
(:mod:`.model_folder`), report writer folders (:mod:`.reporter_folder`), ONNX exports (:mod:`.export`) and the
outputs of ``lvit predict`` (:mod:`.predictions`)."""
