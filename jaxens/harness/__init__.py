"""The application above the library: texts and their splits (:mod:`~jaxens.harness.data`), the
checkpoint zoo (:mod:`~jaxens.harness.zoo`), training of small members
(:mod:`~jaxens.harness.train`), loading members by name (:mod:`~jaxens.harness.members`), the
teacher-forced evaluation (:mod:`~jaxens.harness.evaluate`), bits per byte across tokenizers
(:mod:`~jaxens.harness.bpb`, :mod:`~jaxens.harness.eval_cross`) and the report writers
(:mod:`~jaxens.harness.reports`).

The harness imports the library; the library never imports the harness.
"""
