#include "pluginUtils.h"

#include <atomic>
#include <cstdio>
#include <cstring>

namespace nucleus
{
namespace plugin
{
namespace
{
std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

void log(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept
{
    nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
    nvinfer1::ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
    std::string const text = "[nucleus plugins] " + message;
    if (logger != nullptr)
    {
        logger->log(severity, text.c_str());
    }
    else
    {
        std::fprintf(stderr, "%s\n", text.c_str());
    }
}
} // namespace

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept
{
    gLoggerFinder.store(finder);
}

void logError(std::string const& message) noexcept
{
    log(nvinfer1::ILogger::Severity::kERROR, message);
}

void logWarning(std::string const& message) noexcept
{
    log(nvinfer1::ILogger::Severity::kWARNING, message);
}

FieldReader::FieldReader(char const* pluginName, nvinfer1::PluginFieldCollection const* fc)
    : mPlugin(pluginName)
    , mFields(fc)
{
    check(fc != nullptr, mPlugin + ": no plugin fields were given");
}

bool FieldReader::has(char const* name) const
{
    for (int32_t i = 0; i < mFields->nbFields; ++i)
    {
        char const* fieldName = mFields->fields[i].name;
        if (fieldName != nullptr && std::strcmp(fieldName, name) == 0)
        {
            return true;
        }
    }
    return false;
}

nvinfer1::PluginField const& FieldReader::find(char const* name) const
{
    for (int32_t i = 0; i < mFields->nbFields; ++i)
    {
        char const* fieldName = mFields->fields[i].name;
        if (fieldName != nullptr && std::strcmp(fieldName, name) == 0)
        {
            check(mFields->fields[i].data != nullptr, mPlugin + ": attribute '" + name + "' has no data");
            return mFields->fields[i];
        }
    }
    throw PluginError(mPlugin + ": required attribute '" + name + "' is missing");
}

int32_t FieldReader::getInt32(char const* name) const
{
    nvinfer1::PluginField const& f = find(name);
    check(f.length == 1, mPlugin + ": attribute '" + name + "' must be a single integer");
    int64_t value = 0;
    switch (f.type)
    {
    case nvinfer1::PluginFieldType::kINT32: value = *static_cast<int32_t const*>(f.data); break;
    case nvinfer1::PluginFieldType::kINT64: value = *static_cast<int64_t const*>(f.data); break;
    case nvinfer1::PluginFieldType::kINT16: value = *static_cast<int16_t const*>(f.data); break;
    case nvinfer1::PluginFieldType::kINT8: value = *static_cast<int8_t const*>(f.data); break;
    default: throw PluginError(mPlugin + ": attribute '" + name + "' must be an integer");
    }
    check(value >= INT32_MIN && value <= INT32_MAX, mPlugin + ": attribute '" + name + "' does not fit in int32");
    return static_cast<int32_t>(value);
}

float FieldReader::getFloat32(char const* name) const
{
    nvinfer1::PluginField const& f = find(name);
    check(f.length == 1, mPlugin + ": attribute '" + name + "' must be a single float");
    switch (f.type)
    {
    case nvinfer1::PluginFieldType::kFLOAT32: return *static_cast<float const*>(f.data);
    case nvinfer1::PluginFieldType::kFLOAT64: return static_cast<float>(*static_cast<double const*>(f.data));
    default: throw PluginError(mPlugin + ": attribute '" + name + "' must be a float");
    }
}

std::string FieldReader::getString(char const* name) const
{
    nvinfer1::PluginField const& f = find(name);
    check(f.type == nvinfer1::PluginFieldType::kCHAR && f.length >= 0,
        mPlugin + ": attribute '" + name + "' must be a string");
    char const* text = static_cast<char const*>(f.data);
    std::size_t length = static_cast<std::size_t>(f.length);
    std::size_t const nul = std::string(text, length).find('\0');
    return std::string(text, nul == std::string::npos ? length : nul);
}

void FieldReader::warnUnknown(char const* const* known) const
{
    for (int32_t i = 0; i < mFields->nbFields; ++i)
    {
        char const* fieldName = mFields->fields[i].name;
        bool found = fieldName == nullptr;
        for (char const* const* k = known; !found && *k != nullptr; ++k)
        {
            found = std::strcmp(fieldName, *k) == 0;
        }
        if (!found)
        {
            logWarning(mPlugin + ": ignoring unknown attribute '" + fieldName + "'");
        }
    }
}

bool isFloatType(nvinfer1::DataType type) noexcept
{
    return type == nvinfer1::DataType::kFLOAT || type == nvinfer1::DataType::kHALF
        || type == nvinfer1::DataType::kBF16;
}

NucleusDType toNucleusDType(nvinfer1::DataType type)
{
    switch (type)
    {
    case nvinfer1::DataType::kFLOAT: return NUCLEUS_DTYPE_FLOAT32;
    case nvinfer1::DataType::kHALF: return NUCLEUS_DTYPE_FLOAT16;
    case nvinfer1::DataType::kBF16: return NUCLEUS_DTYPE_BFLOAT16;
    default: throw PluginError("unsupported tensor type: float32, float16 or bfloat16 expected");
    }
}

} // namespace plugin
} // namespace nucleus
