"""Holding Ctrl-C back while the engine's bookkeeping is half done."""

import signal
import threading
from contextlib import contextmanager


@contextmanager
def interrupts_held():
    """Delay a KeyboardInterrupt that arrives inside the block to the block's end.

    Python raises KeyboardInterrupt between any two bytecodes of the main thread; in the
    middle of the few lines that move sequences between queues and hand out blocks it
    would leave them half moved. Other threads never receive it, and a SIGINT handler
    the user installed is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    if previous is not signal.default_int_handler:
        signal.signal(signal.SIGINT, previous)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt
