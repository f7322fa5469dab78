"""Webhooks: the client is told when its prediction starts and when it ends.

A delivery owed is a message of the broker's webhook queue, published by
the worker that ran the task before it acks the task (service/consumer.py),
so it outlives a kill -9 of any replica. Any replica's sender delivers it
(`sender.py`), signed as the Standard Webhooks spec says (`signing.py`),
only to public addresses unless told otherwise (`addresses.py`), and
retries it through delay queues as `schedule.py` decides.
"""
