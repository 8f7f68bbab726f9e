/*
 * _ringcore: the two hot loops of engine.ring and its ordered loads/stores, in C.
 *
 * Why C: a record costs ~700 ns in a pure-Python loop on the dev machine (two int32 stores
 * through a memoryview, a slice copy, arithmetic); the data plane needs < 300 ns per record
 * on each side. Only the loops live here; layout, doorbells and policy stay in engine/ring.py.
 *
 * Memory order: store_release/load_acquire use the GCC __atomic builtins, so publication is
 * correct on aarch64 as well as x86-64. fence() is a full (seq_cst) fence, used by the
 * doorbell protocol to order "store my flag" before "load the other side's position"
 * (store->load order, which neither TSO nor release/acquire gives).
 *
 * Record layout (see engine/ring.py): int32 length (payload + 8), int32 type, payload,
 * padding to 8 bytes; type -1 is the filler before a wrap.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define HEADER 8
#define PADDING_TYPE (-1)

static int
get_slot(Py_buffer *view, Py_ssize_t index, int64_t **slot)
{
    if (index < 0 || (index + 1) * 8 > view->len) {
        PyErr_Format(PyExc_IndexError, "slot out of range: index=%zd, slots=%zd",
                     index, view->len / 8);
        return -1;
    }
    if (((uintptr_t)view->buf) % 8 != 0) {
        PyErr_SetString(PyExc_ValueError, "control block not 8-byte aligned");
        return -1;
    }
    *slot = (int64_t *)view->buf + index;
    return 0;
}

PyDoc_STRVAR(store_release_doc,
"store_release(buffer, index, value)\n--\n\n"
"Store int64 ``value`` at slot ``index`` with release order (all earlier stores first).");

static PyObject *
store_release(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "store_release(buffer, index, value)");
        return NULL;
    }
    Py_ssize_t index = PyLong_AsSsize_t(args[1]);
    long long value = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_WRITABLE) < 0)
        return NULL;
    int64_t *slot;
    if (get_slot(&view, index, &slot) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    __atomic_store_n(slot, (int64_t)value, __ATOMIC_RELEASE);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(load_acquire_doc,
"load_acquire(buffer, index) -> int\n--\n\n"
"Load int64 slot ``index`` with acquire order (before all later loads).");

static PyObject *
load_acquire(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "load_acquire(buffer, index)");
        return NULL;
    }
    Py_ssize_t index = PyLong_AsSsize_t(args[1]);
    if (index == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int64_t *slot;
    if (get_slot(&view, index, &slot) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    int64_t value = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    PyBuffer_Release(&view);
    return PyLong_FromLongLong(value);
}

PyDoc_STRVAR(fence_doc,
"fence()\n--\n\n"
"Full memory fence: no load after it is satisfied before a store before it.");

static PyObject *
fence(PyObject *mod, PyObject *unused)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(write_records_doc,
"write_records(data, tail, limit, payloads, start, type, max_payload) -> (count, tail, status)\n--\n\n"
"Copy records from ``payloads[start:]`` into the data region ``data`` (a writable buffer whose\n"
"length is the ring capacity, a power of two) from position ``tail``, never past position\n"
"``limit`` (committed head + capacity). Does not publish. Returns how many records were\n"
"written, the new tail, and a status: 0 all written, 1 stopped because the ring is full,\n"
"2 stopped at a payload larger than ``max_payload``.");

static PyObject *
write_records(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "write_records(data, tail, limit, payloads, start, type, max_payload)");
        return NULL;
    }
    long long tail = PyLong_AsLongLong(args[1]);
    long long limit = PyLong_AsLongLong(args[2]);
    PyObject *payloads = args[3];
    Py_ssize_t start = PyLong_AsSsize_t(args[4]);
    long type = PyLong_AsLong(args[5]);
    Py_ssize_t max_payload = PyLong_AsSsize_t(args[6]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *seq = PySequence_Fast(payloads, "payloads must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_buffer data;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_WRITABLE) < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    char *base = (char *)data.buf;
    const long long cap = data.len;
    const long long mask = cap - 1;
    Py_ssize_t total = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_ssize_t count = 0;
    int status = 0;
    for (Py_ssize_t i = start; i < total; i++) {
        PyObject *item = items[i];
        const char *src;
        Py_ssize_t n;
        Py_buffer pb;
        int have_pb = 0;
        if (PyBytes_CheckExact(item)) {
            src = PyBytes_AS_STRING(item);
            n = PyBytes_GET_SIZE(item);
        } else {
            if (PyObject_GetBuffer(item, &pb, PyBUF_SIMPLE) < 0) {
                PyBuffer_Release(&data);
                Py_DECREF(seq);
                return NULL;
            }
            have_pb = 1;
            src = (const char *)pb.buf;
            n = pb.len;
        }
        if (n > max_payload) {
            if (have_pb)
                PyBuffer_Release(&pb);
            status = 2;
            break;
        }
        long long size = (n + HEADER + 7) & ~7LL;
        long long index = tail & mask;
        long long to_end = cap - index;
        long long need = size <= to_end ? size : size + to_end;
        if (tail + need > limit) {
            if (have_pb)
                PyBuffer_Release(&pb);
            status = 1;
            break;
        }
        if (size > to_end) {
            int32_t *pad = (int32_t *)(base + index);
            pad[0] = (int32_t)to_end;
            pad[1] = PADDING_TYPE;
            tail += to_end;
            index = 0;
        }
        int32_t *hdr = (int32_t *)(base + index);
        hdr[0] = (int32_t)(n + HEADER);
        hdr[1] = (int32_t)type;
        memcpy(base + index + HEADER, src, (size_t)n);
        if (have_pb)
            PyBuffer_Release(&pb);
        tail += size;
        count++;
    }
    PyBuffer_Release(&data);
    Py_DECREF(seq);
    return Py_BuildValue("nLi", count, tail, status);
}

/*
 * A view of data_obj[offset:offset+len], made the way memoryview slicing makes it (a new view
 * registered on the same managed buffer, then narrowed) minus the slice object and its two
 * ints, which cost more than the view itself. Only valid for 1-D unsigned-byte views, which
 * read_records checks once.
 */
static PyObject *
slice_view(PyObject *data_obj, long long offset, long long len)
{
    PyObject *view = PyMemoryView_FromObject(data_obj);
    if (view == NULL)
        return NULL;
    Py_buffer *b = PyMemoryView_GET_BUFFER(view);
    b->buf = (char *)b->buf + offset;
    b->len = (Py_ssize_t)len;
    b->shape[0] = (Py_ssize_t)len;
    return view;
}

PyDoc_STRVAR(read_records_doc,
"read_records(data, pos, tail, limit) -> (views, pos)\n--\n\n"
"Return memoryview slices of ``data`` (a memoryview over the data region) for up to ``limit``\n"
"records between positions ``pos`` and ``tail``, skipping padding, and the position after\n"
"the last one. The views share ``data``'s buffer: no payload byte is copied.");

static PyObject *
read_records(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "read_records(data, pos, tail, limit)");
        return NULL;
    }
    PyObject *data_obj = args[0];
    long long pos = PyLong_AsLongLong(args[1]);
    long long tail = PyLong_AsLongLong(args[2]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyMemoryView_Check(data_obj)) {
        PyErr_SetString(PyExc_TypeError, "data must be a memoryview");
        return NULL;
    }
    Py_buffer *data = PyMemoryView_GET_BUFFER(data_obj);
    if (data->ndim != 1 || data->itemsize != 1 || data->strides == NULL || data->strides[0] != 1
        || data->format == NULL || strcmp(data->format, "B") != 0) {
        PyErr_SetString(PyExc_TypeError, "data must be a 1-D contiguous memoryview of format 'B'");
        return NULL;
    }
    const char *base = (const char *)data->buf;
    const long long cap = data->len;
    const long long mask = cap - 1;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    Py_ssize_t count = 0;
    while (pos < tail && count < limit) {
        long long index = pos & mask;
        const int32_t *hdr = (const int32_t *)(base + index);
        int32_t length = hdr[0];
        if (length < HEADER || index + length > cap) {
            Py_DECREF(out);
            PyErr_Format(PyExc_RuntimeError,
                         "corrupt ring record: position=%lld, length=%d, capacity=%lld",
                         pos, (int)length, cap);
            return NULL;
        }
        if (hdr[1] == PADDING_TYPE) {
            pos += length;
            continue;
        }
        PyObject *view = slice_view(data_obj, index + HEADER, length - HEADER);
        if (view == NULL || PyList_Append(out, view) < 0) {
            Py_XDECREF(view);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(view);
        pos += (length + 7) & ~7LL;
        count++;
    }
    return Py_BuildValue("NL", out, pos);
}

static PyMethodDef methods[] = {
    {"store_release", (PyCFunction)(void (*)(void))store_release, METH_FASTCALL, store_release_doc},
    {"load_acquire", (PyCFunction)(void (*)(void))load_acquire, METH_FASTCALL, load_acquire_doc},
    {"fence", fence, METH_NOARGS, fence_doc},
    {"write_records", (PyCFunction)(void (*)(void))write_records, METH_FASTCALL, write_records_doc},
    {"read_records", (PyCFunction)(void (*)(void))read_records, METH_FASTCALL, read_records_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ringcore",
    "Hot loops and ordered loads/stores of engine.ring.", -1, methods,
};

PyMODINIT_FUNC
PyInit__ringcore(void)
{
    return PyModule_Create(&module);
}
