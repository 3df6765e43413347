;; A reusable module that echoes its input and the 8 bytes after it, having
;; first written an "X" at the last of those 8: a later, shorter input must
;; find neither an earlier input's tail nor that X there. Its bump allocator
;; keeps the next free byte at address 16 (exported as wd_heap_next), so
;; Warden puts back only the memory below the heap's end.
(module
  (memory (export "memory") 1)
  (global (export "__heap_base") i32 (i32.const 1024))
  (global (export "wd_heap_next") i32 (i32.const 16))
  (func $alloc (export "warden_alloc") (param $len i32) (result i32)
    (local $p i32)
    (local.set $p (i32.load (i32.const 16)))
    (if (i32.eqz (local.get $p)) (then (local.set $p (i32.const 1024))))
    (i32.store (i32.const 16) (i32.add (local.get $p) (local.get $len)))
    (local.get $p))
  (func (export "warden_evaluate") (param $ptr i32) (param $len i32) (result i64)
    (i32.store8 (i32.add (i32.add (local.get $ptr) (local.get $len)) (i32.const 7)) (i32.const 88))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
            (i64.extend_i32_u (i32.add (local.get $len) (i32.const 8))))))
